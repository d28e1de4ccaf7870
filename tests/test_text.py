"""Text encoder: builtin MiniLM offline, T5-family from a folder, s3:// references, errors."""

from __future__ import annotations

import pytest
import torch

from t2v import storage
from t2v.models.text import (
    PromptTooLongError,
    TextEncoder,
    TextEncoderConfig,
    resolve_model_dir,
    shared_text_encoder,
)


@pytest.fixture(scope="module")
def minilm():
    return shared_text_encoder(TextEncoderConfig(max_length=16))


def test_builtin_minilm_shapes_and_mask(minilm):
    emb, mask = minilm(["a red circle moving left", ""])
    assert emb.shape == (2, 16, 384) and mask.shape == (2, 16) and mask.dtype == torch.bool
    assert mask[0].sum() == 7 and mask[1].sum() == 2  # [CLS] a red circle moving left [SEP]
    assert torch.all(emb[~mask] == 0) and emb[mask].abs().sum() > 0
    assert minilm.dim == 384
    assert not any(p.requires_grad for p in minilm.parameters())


def test_deterministic_and_batch_independent(minilm):
    a, _ = minilm(["a blue square moving up"])
    b, _ = minilm(["something else entirely, much longer than the other", "a blue square moving up"])
    torch.testing.assert_close(a[0], b[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(b[0], b[1])


def test_truncation_off_refuses_long_prompt():
    enc = TextEncoder(TextEncoderConfig(max_length=6, truncate=False))
    assert enc.token_counts(["a b c d e f g"]) == [9]
    with pytest.raises(PromptTooLongError, match="9 tokens, more than max_length=6"):
        enc(["ok", "a b c d e f g"])
    enc.config.truncate = True
    emb, mask = enc(["a b c d e f g"])
    assert emb.shape == (1, 6, 384) and bool(mask.all())


def test_missing_model_names_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown builtin"):
        resolve_model_dir("builtin:t5-xxl")


def tiny_t5_folder(root, model_type="umt5"):
    """A random umT5 encoder + a tokenizer built offline with `tokenizers`, diffusers layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "moving", "left", "blue"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=2,
                     num_heads=4, relative_attention_num_buckets=8)
    UMT5EncoderModel(cfg).save_pretrained(root / "text_encoder")
    return root / "text_encoder"


def test_umt5_folder_with_sibling_tokenizer(tmp_path):
    ref = tiny_t5_folder(tmp_path)
    enc = TextEncoder(TextEncoderConfig(ref=str(ref), max_length=8))
    emb, mask = enc(["a red circle moving left", ""])
    assert type(enc.model).__name__ == "UMT5EncoderModel"
    assert emb.shape == (2, 8, 16) and mask[0].sum() == 5 and enc.dim == 16


def test_model_from_s3_prefix(moto_s3, s3_bucket, tmp_path, monkeypatch):
    local = tiny_t5_folder(tmp_path / "src")
    monkeypatch.setenv("T2V_CACHE", str(tmp_path / "cache"))
    for sub in ("text_encoder", "tokenizer"):
        for f in (local.parent / sub).iterdir():
            storage.upload_file(f, storage.join(s3_bucket, "wan", sub, f.name))
    enc = TextEncoder(TextEncoderConfig(ref=storage.join(s3_bucket, "wan", "text_encoder"),
                                        tokenizer=storage.join(s3_bucket, "wan", "tokenizer"),
                                        max_length=8))
    ref = TextEncoder(TextEncoderConfig(ref=str(local), max_length=8))
    torch.testing.assert_close(enc(["a blue circle"])[0], ref(["a blue circle"])[0])
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        resolve_model_dir(storage.join(s3_bucket, "nothing-here"))


def test_hidden_state_layer(minilm):
    """`layer`: -1 is the last hidden state (the default); 0 the input embeddings, where a word
    is the same vector whatever surrounds it (padding still zeroed); out of range: one line."""
    prompts = ["a red triangle moving left", "a blue triangle moving up"]
    last, mask = minilm(prompts)
    minus_one = shared_text_encoder(TextEncoderConfig(max_length=16, layer=-1))
    # A process keeps what it loaded per config (a driver that starts several runs loads once).
    assert minus_one is not minilm and shared_text_encoder(TextEncoderConfig(max_length=16)) is minilm
    again, _ = minus_one(prompts)
    torch.testing.assert_close(again, last, rtol=0, atol=0)
    flat, flat_mask = TextEncoder(TextEncoderConfig(max_length=16, layer=0))(prompts)
    assert torch.equal(flat_mask, mask) and (flat[~mask] == 0).all()
    triangle = 3  # [CLS] a red|blue triangle ...
    assert torch.equal(flat[0, triangle], flat[1, triangle])
    assert not torch.allclose(last[0, triangle], last[1, triangle], atol=1e-3)
    with pytest.raises(ValueError, match=r"layer=7: .* has hidden states 0\.\.6"):
        TextEncoder(TextEncoderConfig(layer=7))
