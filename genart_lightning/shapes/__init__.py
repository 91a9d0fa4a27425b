"""The shapes plug-in: prompts with known attributes, a judge that reads them back, and its accuracy metric."""
