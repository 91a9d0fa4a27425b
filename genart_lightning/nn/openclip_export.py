"""An OpenCLIP text tower as a transformers `CLIPTextModel` and CLIP tokenizer: the text half of a Stable Diffusion
pipeline that reads captions as a model conditioned on `FrozenTextEncoder` reads them.

The weights go through diffusers' own converter for OpenCLIP checkpoints (`convert_open_clip_checkpoint`, what
`from_single_file` runs on SD 2 checkpoints: each block's `in_proj` split into q/k/v, `resblocks` -> `encoder.layers`,
`ln_final` -> `final_layer_norm`), under a prefix of ours so that its SD 2 ignore list (block 23 of a 24-block tower,
keyed by `cond_stage_model.model.`) drops nothing we did not choose to drop. `text_layer: penultimate` keeps every
block but the last and reads it through the final layer norm, as SD 2's diffusers text encoder does (23 of ViT-H-14's
24 layers). The tokenizer is CLIP's BPE table from open_clip's copy, padding with "!" (id 0) as OpenCLIP pads: a
causal CLIPTextModel's states after the end token depend on the padding, and the U-Net attends to all of them.
transformers and diffusers are the optional extra `[diffusers]`.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path
from typing import Any

import open_clip
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

from genart_lightning.nn.diffusers_parts import require_diffusers
from genart_lightning.nn.text_encoder import CONTRASTIVE_ONLY, FrozenTextEncoder
from genart_lightning.nn.transformers_text import require_transformers

CLIP_VOCAB = 49408
"""CLIP's BPE vocabulary: 512 byte symbols, 48894 merges, start and end of text."""
PAD_TOKEN = "!"
"""Id 0 of CLIP's vocabulary, the id OpenCLIP pads with (SD 2's diffusers tokenizer pads with it for that reason)."""
PREFIX = "open_clip."
"""The key prefix the tower's weights carry into diffusers' converter (any but the SD 2 checkpoint's own)."""


def write_clip_tokenizer_files(folder: Path) -> Path:
    """vocab.json and merges.txt of CLIP's BPE tokenizer (49408 tokens), from open_clip's copy of the table."""
    table = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(table.read_bytes()).decode().split("\n")
    merges = [tuple(line.split()) for line in lines[1:CLIP_VOCAB - 2 * 256 - 2 + 1]]  # the rest: 512 byte symbols, 2 specials
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def _activation(module: nn.Module) -> str | None:
    """transformers' `hidden_act` name of an OpenCLIP MLP activation (ViT-H-14: exact gelu; OpenAI's CLIP: quick_gelu)."""
    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(module.approximate)
    return None


def conversion_blocker(encoder: FrozenTextEncoder) -> str | None:
    """Why `encoder` has no exact CLIPTextModel + CLIPTokenizer form; None when it has one."""
    clip, name = encoder.clip, encoder.model_name
    blocks = getattr(getattr(clip, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(clip, "token_embedding"):
        return f"the text tower of OpenCLIP {name} is not a CLIP text transformer"
    if getattr(clip, "attn_mask", None) is None:
        return f"the text tower of OpenCLIP {name} attends without a causal mask, which CLIPTextModel always applies"
    for block in blocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv") or not (
                isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            return f"the text tower of OpenCLIP {name} has {type(block).__name__}s with layer scale or extra norms"
        if _activation(block.mlp.gelu) is None:
            return f"the text tower of OpenCLIP {name} uses {type(block.mlp.gelu).__name__}, which CLIPTextModel lacks"
    norms = [m for m in clip.modules() if isinstance(m, nn.LayerNorm)]
    if len({m.eps for m in norms}) != 1:
        return f"the text tower of OpenCLIP {name} mixes layer norm eps values; CLIPTextModel has one"
    tokenizer = encoder.tokenizer
    if type(tokenizer) is not SimpleTokenizer or tokenizer.vocab_size != CLIP_VOCAB or tokenizer.reduction_fn is not None \
            or getattr(tokenizer.clean_fn, "__name__", "") != "_clean_lower":
        return f"OpenCLIP {name} does not tokenize with CLIP's lower-cased BPE tokenizer"
    return None


def clip_text_config(encoder: FrozenTextEncoder) -> dict[str, Any]:
    """`CLIPTextConfig` settings of the tower as `encoder` reads it (penultimate: one block fewer)."""
    clip = encoder.clip
    block, projection, tokenizer = clip.transformer.resblocks[0], clip.text_projection, encoder.tokenizer
    if projection is not None:  # metadata only: CLIPTextModel has no projection
        projection_dim = projection.out_features if isinstance(projection, nn.Linear) else projection.shape[-1]
    return {
        "vocab_size": clip.token_embedding.num_embeddings, "hidden_size": clip.transformer.width,
        "intermediate_size": block.mlp.c_fc.out_features, "num_attention_heads": block.attn.num_heads,
        "num_hidden_layers": len(clip.transformer.resblocks) - (encoder.layer == "penultimate"),
        "max_position_embeddings": clip.positional_embedding.shape[0], "hidden_act": _activation(block.mlp.gelu),
        "layer_norm_eps": clip.ln_final.eps, "pad_token_id": tokenizer.encoder[PAD_TOKEN],
        "bos_token_id": tokenizer.sot_token_id, "eos_token_id": tokenizer.eot_token_id,
        "projection_dim": clip.transformer.width if projection is None else projection_dim,
    }


def clip_text_model(encoder: FrozenTextEncoder) -> Any:
    """The tower as a transformers `CLIPTextModel` whose last hidden state is `encoder`'s token states (`text_layer`
    final or penultimate), at every position. The text projection is CLIP's contrastive head, which SD pipelines do
    not read: it is not carried over."""
    transformers = require_transformers()
    require_diffusers()
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    if (blocker := conversion_blocker(encoder)) is not None:
        raise ValueError(f"{blocker}: it has no exact CLIPTextModel form")
    config = transformers.CLIPTextConfig(**clip_text_config(encoder))
    model = transformers.CLIPTextModel(config)
    dropped = f"transformer.resblocks.{config.num_hidden_layers}."  # the last block, for text_layer penultimate
    state = {PREFIX + key: value.detach() for key, value in encoder.clip.state_dict().items()
             if key not in (*CONTRASTIVE_ONLY, "text_projection") and not key.startswith(dropped)}
    converted = convert_open_clip_checkpoint(model, state, prefix=PREFIX)
    if not hasattr(model, "text_model"):  # transformers flattened CLIPTextModel; diffusers' keys keep the wrapper
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    model.load_state_dict(converted, strict=True)  # every weight placed, none left over
    return model.eval()


def clip_tokenizer(encoder: FrozenTextEncoder) -> Any:
    """CLIP's tokenizer as transformers has it, giving OpenCLIP's ids: padded with id 0 to the tower's context length.

    A pad token is a special token, and transformers matches special tokens in the text before BPE: SD 2's tokenizer
    turns every "!" of a prompt into padding (diffusers #4153), where OpenCLIP reads "!</w>" (256).
    `split_special_tokens` sends special-token text through BPE like any other, as OpenCLIP does.
    """
    transformers = require_transformers()
    with tempfile.TemporaryDirectory() as folder:
        return transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(Path(folder)), pad_token=PAD_TOKEN,
                                                          model_max_length=encoder.context_length,
                                                          split_special_tokens=True)
