"""The frozen text encoder stays out of saved models and still lets strict loading catch real missing keys."""

from __future__ import annotations

import pytest
from torch import nn

from genart_lightning.nn.text_encoder import FrozenTextEncoder


class Captioned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Loaded before the encoder, with keys that end like the encoder's own ("clip.ln_final.weight"): they
        # must still be checked.
        self.head = nn.Module()
        self.head.clip = nn.Module()
        self.head.clip.ln_final = nn.LayerNorm(64)
        self.text_encoder = FrozenTextEncoder()


def test_encoder_keys_are_neither_saved_nor_missing_but_other_keys_are_checked() -> None:
    model = Captioned()
    saved = model.state_dict()
    assert saved and not any(k.startswith("text_encoder.") for k in saved)
    Captioned().load_state_dict(saved, strict=True)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "head.clip.ln_final.bias"'):
        Captioned().load_state_dict({"head.clip.ln_final.weight": saved["head.clip.ln_final.weight"]}, strict=True)
    # Loaded on its own, the encoder takes an empty state dict.
    assert FrozenTextEncoder().load_state_dict({}, strict=True).missing_keys == []
