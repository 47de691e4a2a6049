"""Text tower: parity with llm2vec, batched latent attention, weight layouts, train modes, cache, offline errors.

All on a 2-layer random Llama (hidden 64) with a tokenizer trained on the spot, built once per session.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from llm2vec import LLM2Vec
from safetensors.torch import save_file
from torch import nn

from ct_siglip.errors import ConfigError
from ct_siglip.pooling import LatentAttentionPooling
from ct_siglip.text_tower import (
    LLAMA3_USER_PREFIX,
    LLAMA3_USER_SUFFIX,
    SEPARATOR,
    TextEncoder,
    TextTokenizer,
    text_hash,
)
from ct_siglip.tiny_models import build_tiny_llama

REPORTS = [
    "Small left pleural effusion.",
    "No focal consolidation, pleural effusion or pneumothorax. Mild cardiomegaly without pulmonary edema.",
    "Emphysema.",
    "A 6 mm solid nodule in the right upper lobe; follow-up CT recommended. Coronary calcifications.",
]
INSTRUCTION = "Represent the chest CT findings for retrieving the matching scan:"
MAX_LEN = 64
# Same float32 weights and inputs as llm2vec; only the order of the additions in the pooled mean differs
# (masked sum / count vs slice.mean), i.e. a few float32 ulps of O(1) values: 1e-6 is ~10 ulps.
ATOL = 1e-6

LLM2VEC4CXR_LATENT_KEYS = {
    "latent_attn.latents",
    "latent_attn.multihead_attn.in_proj_weight",
    "latent_attn.multihead_attn.in_proj_bias",
    "latent_attn.multihead_attn.out_proj.weight",
    "latent_attn.multihead_attn.out_proj.bias",
    "latent_attn.mlp.0.weight",
    "latent_attn.mlp.0.bias",
    "latent_attn.mlp.2.weight",
    "latent_attn.mlp.2.bias",
}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def reference(tiny_llama):
    """llm2vec's own model on the same folder: the reference the project must reproduce."""
    return LLM2Vec.from_pretrained(str(tiny_llama), pooling_mode="mean", max_length=MAX_LEN, torch_dtype=torch.float32)


def encoder(tiny_llama, **kwargs) -> TextEncoder:
    kwargs.setdefault("max_length", MAX_LEN)
    kwargs.setdefault("embed_dim", 16)
    return TextEncoder(str(tiny_llama), **kwargs)


def per_sample_latent_pool(pool: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """llm2vec4cxr's computation, one sample at a time: the masked (right-aligned) tokens are the queries of
    nn.MultiheadAttention over the latent table, then the MLP, then the mean over those tokens."""
    out = []
    for i, n in enumerate(mask.sum(dim=1).tolist()):
        tokens = hidden[i, hidden.shape[1] - n :].unsqueeze(0)
        latents = pool.latents.unsqueeze(0)
        attended, _ = pool.multihead_attn(query=tokens, key=latents, value=latents)
        out.append(pool.mlp(attended).mean(dim=1)[0])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# 1. Parity with llm2vec
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("instruction", [None, INSTRUCTION], ids=["no_instruction", "instruction"])
def test_tokenizer_and_mean_embedding_equal_llm2vec(tiny_llama, reference, instruction):
    enc = encoder(tiny_llama, instruction=instruction).eval()
    batch = enc.tokenize(REPORTS)
    ref_batch = reference.tokenize([reference._convert_to_str(instruction or "", r) for r in REPORTS])
    for key in ("input_ids", "attention_mask", "embed_mask"):
        assert torch.equal(batch[key], ref_batch[key]), key
    if instruction:  # only the report tokens are pooled
        assert (batch["embed_mask"].sum(1) < batch["attention_mask"].sum(1)).all()

    with torch.no_grad():
        ours = enc.embed(batch)
        ref_forward = reference.forward(dict(ref_batch))
    ref_encode = reference.encode([[instruction or "", r] for r in REPORTS], show_progress_bar=False, device="cpu")
    assert ours.dtype == torch.float32 and ours.shape == (len(REPORTS), enc.hidden_size)
    torch.testing.assert_close(ours, ref_forward, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours, ref_encode, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["weighted_mean", "eos_token", "bos_token"])
def test_other_pooling_modes_equal_llm2vec_get_pooling(tiny_llama, reference, mode):
    enc = encoder(tiny_llama, pooling_mode=mode, instruction=INSTRUCTION).eval()
    batch = enc.tokenize(REPORTS)
    if mode == "eos_token":  # the real EOS is appended, so the last position pools it
        assert (batch["input_ids"][:, -1] == enc.tokenizer.tokenizer.eos_token_id).all()
    features = {k: batch[k].clone() for k in ("input_ids", "attention_mask", "embed_mask")}
    reference.pooling_mode = mode
    try:
        with torch.no_grad():
            expected = reference.forward(features)
            ours = enc.embed(batch)
    finally:
        reference.pooling_mode = "mean"
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_chat_template_wraps_like_llm2vec4cxr(reference):
    tok = TextTokenizer(reference.tokenizer, MAX_LEN, INSTRUCTION, chat_template=True)
    wrapped = [
        LLAMA3_USER_PREFIX + reference._convert_to_str(INSTRUCTION, r).strip() + LLAMA3_USER_SUFFIX for r in REPORTS
    ]
    ours, ref = tok(REPORTS), reference.tokenize(wrapped)
    for key in ("input_ids", "attention_mask", "embed_mask"):
        assert torch.equal(ours[key], ref[key]), key
    eot = reference.tokenizer.convert_tokens_to_ids(LLAMA3_USER_SUFFIX)
    assert (ours["input_ids"][:, -1] == eot).all() and (ours["embed_mask"][:, -1] == 1).all()


# ---------------------------------------------------------------------------------------------------------------
# 2. Latent attention
# ---------------------------------------------------------------------------------------------------------------


def test_latent_attention_batched_equals_per_sample_with_uneven_lengths():
    torch.manual_seed(0)
    pool = LatentAttentionPooling(32, num_latents=16, num_heads=8).double()
    lengths, width = [7, 3, 1, 5], 7
    hidden = 3 * torch.randn(len(lengths), width, 32, dtype=torch.float64)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = 1
    hidden[mask == 0] = 1e6 * torch.randn(int((mask == 0).sum()), 32, dtype=torch.float64)  # padding: irrelevant
    with torch.no_grad():
        batched = pool(hidden, mask)
        expected = per_sample_latent_pool(pool, hidden, mask)
    torch.testing.assert_close(batched, expected, atol=1e-12, rtol=0)
    assert {f"latent_attn.{k}" for k in pool.state_dict()} == LLM2VEC4CXR_LATENT_KEYS


# ---------------------------------------------------------------------------------------------------------------
# 3. Weight layouts
# ---------------------------------------------------------------------------------------------------------------


def llm2vec4cxr_state_dict(tiny_llama, seed: int = 1) -> tuple[dict[str, torch.Tensor], nn.Module, nn.Module]:
    """A state dict in the llm2vec4cxr LLM2Vec layout (`model.*` + `latent_attn.*`), built independently of
    ct_siglip: llm2vec's LlamaBiModel with perturbed weights, and a latent head with the release's names."""
    torch.manual_seed(seed)
    llm = LLM2Vec.from_pretrained(str(tiny_llama), torch_dtype=torch.float32).model
    with torch.no_grad():
        for p in llm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hidden = llm.config.hidden_size
    head = nn.Module()
    head.latents = nn.Parameter(torch.randn(512, hidden))
    head.multihead_attn = nn.MultiheadAttention(hidden, 8, batch_first=True)
    head.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    state = {f"model.{k}": v for k, v in llm.state_dict().items()}
    state |= {f"latent_attn.{k}": v for k, v in head.state_dict().items()}
    return state, llm.eval(), head.eval()


def test_llm2vec4cxr_layout_loads_without_missing_or_unexpected_keys(tiny_llama, tmp_path):
    state, llm, head = llm2vec4cxr_state_dict(tiny_llama)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    enc = encoder(tiny_llama, text_model_path=str(path), pooling_mode="latent_attention", instruction=INSTRUCTION)
    own = enc.state_dict()
    assert set(own) - set(state) == {"projection.weight", "projection.bias"}  # all the file, and only it
    for key, value in state.items():
        assert torch.equal(own[key], value), key

    # ... and the encoder computes llm2vec4cxr's embedding from them.
    batch = enc.tokenize(REPORTS)
    with torch.no_grad():
        hidden = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        expected = per_sample_latent_pool(head, hidden, batch["embed_mask"])
        ours = enc.eval().embed(batch)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_llm2vec4cxr_hub_folder_layout_loads_as_weights_or_as_base(tiny_llama, tmp_path):
    """The hub release is a saved model folder: bare Llama keys plus latent_attn.* in model.safetensors."""
    state, _, _ = llm2vec4cxr_state_dict(tiny_llama)
    folder = tmp_path / "llm2vec4cxr"
    folder.mkdir()
    for f in tiny_llama.iterdir():  # config + tokenizer, as the release ships them
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    save_file(
        {k.removeprefix("model."): v.contiguous() for k, v in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )

    as_weights = encoder(tiny_llama, text_model_path=str(folder), pooling_mode="latent_attention")
    as_base = encoder(folder, pooling_mode="latent_attention")
    for enc in (as_weights, as_base):
        own = enc.state_dict()
        for key, value in state.items():
            assert torch.equal(own[key], value), key


def test_weights_with_extra_or_missing_keys_fail_clearly(tiny_llama, tmp_path):
    state, _, _ = llm2vec4cxr_state_dict(tiny_llama)
    extra = dict(state, **{"latent_attn.extra": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    cases = [
        (extra, "latent_attention", r"unexpected keys: latent_attn\.extra"),
        (missing, "latent_attention", r"missing keys: model\.norm\.weight"),
        (state, "mean", "use --pooling_mode latent_attention"),
        ({"projection.weight": torch.zeros(16, 64)}, "mean", "holds no LLM weights"),
    ]
    for i, (sd, pooling, message) in enumerate(cases):
        path = tmp_path / f"case{i}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        with pytest.raises(ConfigError, match=message) as err:
            encoder(tiny_llama, text_model_path=str(path), pooling_mode=pooling)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_checkpoint_of_this_package_loads_its_text_tower(tiny_llama, tmp_path):
    torch.manual_seed(2)
    trained = encoder(tiny_llama, pooling_mode="latent_attention", num_latents=8)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model_state = {f"text_encoder.{k}": v for k, v in trained.state_dict().items()}
    model_state |= {"image_encoder.projection.0.weight": torch.randn(4, 4), "loss_fn.t_prime": torch.zeros(())}
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model_state, "config": {"text_train": "full", "lora_r": 16}, "step": 7}, path)

    loaded = encoder(tiny_llama, text_model_path=str(path), pooling_mode="latent_attention", num_latents=8)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_lora_checkpoint_loads_in_lora_mode_and_is_refused_elsewhere(tiny_llama, tmp_path):
    torch.manual_seed(3)
    trained = encoder(tiny_llama, train_mode="lora")
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name or name.startswith("projection."):
                p.add_(torch.randn_like(p))
    path = tmp_path / "lora.pt"
    torch.save({"model": {f"text_encoder.{k}": v for k, v in trained.state_dict().items()}, "config": {}}, path)
    loaded = encoder(tiny_llama, text_model_path=str(path), train_mode="lora")
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="--text_train lora"):
        encoder(tiny_llama, text_model_path=str(path), train_mode="full")


# ---------------------------------------------------------------------------------------------------------------
# 4. Train modes and the frozen cache
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "pooling"),
    [("full", "mean"), ("lora", "latent_attention"), ("frozen", "mean")],
    ids=["full", "lora", "frozen"],
)
def test_train_mode_trains_exactly_its_parameters(tiny_llama, mode, pooling):
    enc = encoder(tiny_llama, train_mode=mode, pooling_mode=pooling, num_latents=8).train()
    names = [n for n, _ in enc.named_parameters()]
    if mode == "full":
        expected = set(names)
    elif mode == "lora":
        expected = {n for n in names if "lora_" in n or n.startswith(("projection.", "latent_attn."))}
        n_layers = enc.model.config.num_hidden_layers
        assert sum("lora_A" in n for n in expected) == 7 * n_layers  # every target module of every layer
    else:
        expected = {"projection.weight", "projection.bias"}

    out = enc(enc.tokenize(REPORTS))
    (out * torch.randn_like(out)).sum().backward()
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == expected
    assert {n for n, p in enc.named_parameters() if p.grad is not None} == expected
    assert enc.model.training == (mode != "frozen")
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(REPORTS)))


def test_gradient_checkpointing_gives_same_output_and_gradients(tiny_llama):
    enc = encoder(tiny_llama, train_mode="full").train()
    batch = enc.tokenize(REPORTS)
    results = []
    for enabled in (True, False):
        enc.set_grad_checkpointing(enabled)
        enc.zero_grad(set_to_none=True)
        out = enc(batch)
        out[:, 0].sum().backward()
        results.append((out.detach(), enc.model.layers[0].mlp.up_proj.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_frozen_cache_is_hit_on_second_pass_and_reused_from_disk(tiny_llama, tmp_path):
    enc = encoder(tiny_llama, train_mode="frozen", cache_dir=str(tmp_path))
    calls = count_calls(enc.model)
    batches = [enc.tokenize(REPORTS[:3]), enc.tokenize(REPORTS[2:])]  # REPORTS[2] is in both
    first = [enc.embed(b) for b in batches]
    assert calls[0] == 2 and len(enc._cache) == len(REPORTS)  # each distinct report embedded once
    second = [enc.embed(b) for b in batches]
    assert calls[0] == 2  # second epoch: no LLM forward at all
    for a, b in zip(first, second):
        assert torch.equal(a, b)

    # What is cached is the embedding the unfrozen tower computes.
    with torch.no_grad():
        direct = encoder(tiny_llama).eval().embed(batches[0])
    torch.testing.assert_close(first[0], direct, atol=ATOL, rtol=0)

    enc.flush_cache()
    fresh = encoder(tiny_llama, train_mode="frozen", cache_dir=str(tmp_path))
    fresh_calls = count_calls(fresh.model)
    assert torch.equal(fresh.embed(batches[1]), first[1]) and fresh_calls[0] == 0
    other = encoder(tiny_llama, train_mode="frozen", cache_dir=str(tmp_path), max_length=32)
    assert len(other._cache) == 0  # another setting gets another cache folder


# ---------------------------------------------------------------------------------------------------------------
# 5. Workers and offline use
# ---------------------------------------------------------------------------------------------------------------


def test_tokenizer_survives_pickle_and_hashes_are_stable(tiny_llama):
    tok = encoder(tiny_llama, instruction=INSTRUCTION).tokenizer
    clone = pickle.loads(pickle.dumps(tok))
    a, b = tok(REPORTS), clone(REPORTS)
    assert a.keys() == b.keys() == {"input_ids", "attention_mask", "embed_mask", "text_hash"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["text_hash"].dtype == torch.int64 and (a["text_hash"] >= 0).all()
    assert a["text_hash"][0].item() == text_hash(f"{INSTRUCTION} {SEPARATOR}{REPORTS[0]}")
    assert len(set(a["text_hash"].tolist())) == len(REPORTS)


def test_unavailable_hub_id_fails_with_one_clear_line(tiny_llama):
    with pytest.raises(ConfigError, match="--text_model /path/to/folder") as err:
        TextEncoder("ct-siglip-tests/no-such-model")
    assert "HF_HOME" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="--text_model_path /path/to/folder"):
        encoder(tiny_llama, text_model_path="ct-siglip-tests/no-such-weights")
    with pytest.raises(ConfigError, match="no such folder"):
        TextEncoder("./no/such/folder")


def test_build_tiny_llama_is_deterministic(tmp_path):
    a, b, c = (build_tiny_llama(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_peft_adapter_is_merged_like_llm2vec(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    base = LLM2Vec.from_pretrained(str(tiny_llama), torch_dtype=torch.float32).model
    adapter = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_()
    adapter.save_pretrained(tmp_path / "adapter")

    ref = LLM2Vec.from_pretrained(
        str(tiny_llama),
        peft_model_name_or_path=str(tmp_path / "adapter"),
        max_length=MAX_LEN,
        torch_dtype=torch.float32,
    )
    enc = encoder(tiny_llama, peft_path=str(tmp_path / "adapter"), train_mode="frozen")
    batch = enc.tokenize(REPORTS)
    with torch.no_grad():
        expected = ref.forward({k: batch[k].clone() for k in ("input_ids", "attention_mask", "embed_mask")})
        plain = encoder(tiny_llama).eval().embed(batch)
    torch.testing.assert_close(enc.embed(batch), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter did change the model


def test_bf16_llm_still_pools_and_projects_in_float32(tiny_llama):
    enc = encoder(tiny_llama, torch_dtype=torch.bfloat16, attn_implementation="auto").eval()
    full = encoder(tiny_llama).eval()
    batch = enc.tokenize(REPORTS)
    with torch.no_grad():
        pooled, out = enc.embed(batch), enc(batch)
        pooled32 = full.embed(batch)
    assert next(enc.model.parameters()).dtype == torch.bfloat16 and enc.projection.weight.dtype == torch.float32
    assert pooled.dtype == out.dtype == torch.float32
    torch.testing.assert_close(pooled, pooled32, atol=0.1, rtol=0.05)  # bf16 weights: ~3 significant digits


def test_uncased_prefix_space_tokenizer_gives_one_token_per_word_and_still_equals_llm2vec(tmp_path):
    """The demo's tokenizer (lowercase, prefix space): "No" opening a report, "no" inside a sentence and the first
    word of a prompt are one token, so short prompts use the tokens the reports taught; llm2vec parity holds."""
    corpus = [*REPORTS, "There is no pleural effusion.", "No pleural effusion. There is emphysema."]
    folder = build_tiny_llama(tmp_path / "uncased", corpus, vocab_size=300, lowercase=True, prefix_space=True)
    enc = encoder(folder).eval()
    short, long = (enc.tokenize([t])["input_ids"][0].tolist() for t in ("No effusion.", "There is no effusion."))
    assert short[1:] == long[-(len(short) - 1) :]  # after BOS, "No effusion." opening a text == its mid-sentence form
    ref = LLM2Vec.from_pretrained(str(folder), pooling_mode="mean", max_length=MAX_LEN, torch_dtype=torch.float32)
    batch = enc.tokenize(REPORTS)
    ref_batch = ref.tokenize([ref._convert_to_str("", r) for r in REPORTS])
    for key in ("input_ids", "attention_mask", "embed_mask"):
        assert torch.equal(batch[key], ref_batch[key]), key
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(batch), ref.forward(dict(ref_batch)), atol=ATOL, rtol=0)
