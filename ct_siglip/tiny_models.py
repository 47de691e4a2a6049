"""Tiny random models for offline tests, the demo and the CPU benchmark.

`build_tiny_llama` writes a random few-layer Llama with a freshly trained tokenizer; it loads with
`llm2vec.LLM2Vec.from_pretrained` and `ct_siglip.text_tower.TextEncoder` like the real text model.
"""

from __future__ import annotations

from pathlib import Path

import torch

_TINY_CORPUS = (
    "No focal consolidation, pleural effusion or pneumothorax.",
    "Small left pleural effusion with adjacent basal atelectasis.",
    "Moderate right pleural effusion, increased since the prior study.",
    "The heart size is normal. The mediastinal contours are unremarkable.",
    "Mild cardiomegaly without pulmonary edema.",
    "A 6 mm solid nodule in the right upper lobe, follow-up CT recommended.",
    "Ground-glass opacities in both lower lobes, compatible with infection.",
    "Emphysematous changes, predominantly in the upper lobes.",
    "No enlarged mediastinal or hilar lymph nodes.",
    "Calcified granuloma in the left lower lobe.",
    "Bronchiectasis with bronchial wall thickening in the middle lobe.",
    "The airways are patent. No endobronchial lesion.",
    "Coronary artery calcifications are noted.",
    "Degenerative changes of the thoracic spine.",
    "Interval resolution of the previously seen consolidation.",
    "Subsegmental atelectasis at both lung bases.",
    "Spiculated mass in the left upper lobe measuring 3.2 cm, suspicious for malignancy.",
    "Small pericardial effusion. No pleural effusion.",
    "Pulmonary embolism in the right lower lobe segmental arteries.",
    "Interstitial thickening with honeycombing at the bases, suggestive of fibrosis.",
    "Post-surgical changes after right upper lobectomy.",
    "The thyroid gland is unremarkable. The visualized upper abdomen is normal.",
    "Hiatal hernia. Aortic atherosclerosis without aneurysm.",
    "Findings: lungs clear. Impression: no acute cardiopulmonary process.",
)
_TINY_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def build_tiny_llama(
    out_dir: str | Path,
    corpus: list[str] | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 1000,
    seed: int = 0,
    lowercase: bool = False,
    prefix_space: bool = False,
) -> Path:
    """Write a random few-layer Llama plus a byte-level BPE tokenizer trained on the spot, all offline.

    Llama-3-like on purpose: BOS `<|begin_of_text|>` prepended, EOS `<|eot_id|>`, the chat header tokens, and
    grouped-query attention (half as many KV heads when the head count is even), so the real model's code paths run. The folder loads with
    `llm2vec.LLM2Vec.from_pretrained(out_dir)` and `TextEncoder(out_dir)`. Same seed, same files.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(_TINY_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(list(corpus or _TINY_CORPUS), trainer=trainer)
    bos, eos = _TINY_SPECIALS[0], _TINY_SPECIALS[4]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        model_max_length=4096,
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],  # as Llama's: no token_type_ids
    )
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=max(vocab_size, tok.get_vocab_size()), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads // 2 if num_heads % 2 == 0 else num_heads,
        max_position_embeddings=4096, bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos),
        initializer_range=0.05, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaModel(config)
    model.save_pretrained(out, safe_serialization=True)
    return out
