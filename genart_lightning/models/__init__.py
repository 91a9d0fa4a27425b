"""Generator families: each a LightningModule holding one objective and its step."""
