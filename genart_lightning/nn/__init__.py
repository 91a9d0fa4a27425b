"""Network building blocks: plain nn.Modules with typed keyword arguments, no Lightning."""
