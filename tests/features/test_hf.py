"""The `transformers` family on tiny randomly initialised models of each architecture (ViT, DINOv2
with registers, CLIP, SigLIP, BERT) saved locally with their processors and tokenizers, through the
same AutoModel / AutoImageProcessor / AutoTokenizer path as a hub model; every feature is compared
with the saved model run independently of sparc."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    GPT2Config,
    GPT2Model,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from sparc.features.base import count_truncated
from sparc.features.extract import cpu_threads, extract_stream, model_threads
from sparc.features.registry import build_extractor
from sparc.features.store import open_stream

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = 2
TINY = dict(hidden_size=32, num_hidden_layers=BLOCKS, num_attention_heads=2, intermediate_size=64)
WORDS = "a an the red blue green black orange purple teal circle square horizontal stripe photo of cat word".split()
LONG = "a red circle " * 6  # 18 words: longer than every tiny model's token limit
HUB_NAME = "google/vit-tiny-sparc-test"


def bert_dir(root: Path) -> Path:
    """BERT: WordPiece vocabulary of WORDS, 16 positions."""
    out = root / "bert"
    out.mkdir()
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(vocab=str(out / "vocab.txt")).save_pretrained(out)
    BertModel(BertConfig(**TINY, vocab_size=len(WORDS) + 5, max_position_embeddings=16)).save_pretrained(out)
    return out


def clip_dir(root: Path) -> Path:
    """CLIP: a byte-level BPE tokenizer without merges (one token per character), 16 text
    positions, 32 px images in 8 px patches, 24-d projections."""
    out = root / "clip"
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    bos, eos = len(vocab), len(vocab) + 1
    vocab |= {"<|startoftext|>": bos, "<|endoftext|>": eos}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(out)
    text = dict(TINY, vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(TINY, image_size=32, patch_size=8), projection_dim=24)).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def siglip_dir(root: Path) -> Path:
    """SigLIP: a word-level tokenizer ending captions in </s> (also the padding), 12 positions."""
    out = root / "siglip"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="</s>", unk_token="<unk>", model_max_length=12
    ).save_pretrained(out)
    config = SiglipConfig(
        text_config=dict(TINY, vocab_size=len(vocab), max_position_embeddings=12),
        vision_config=dict(TINY, image_size=32, patch_size=8),
    )
    SiglipModel(config).save_pretrained(out)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def vit_dir(root: Path) -> Path:
    out = root / "vit"
    ViTModel(ViTConfig(**TINY, image_size=32, patch_size=8)).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def dinov2_dir(root: Path) -> Path:
    """DINOv2 with 2 register tokens, 28 px crops in 14 px patches (CLS, 2 registers, 4 patches)."""
    out = root / "dinov2"
    config = Dinov2WithRegistersConfig(**TINY, image_size=28, patch_size=14, num_register_tokens=2)
    Dinov2WithRegistersModel(config).save_pretrained(out)
    BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(out)
    return out


def gpt2_dir(root: Path) -> Path:
    """GPT-2 (decoder-only): a word-level tokenizer with an end token and no padding token."""
    out = root / "gpt2"
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(out)
    GPT2Model(GPT2Config(n_embd=32, n_layer=BLOCKS, n_head=2, n_positions=16, vocab_size=len(vocab))).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    return {f.__name__[:-4]: f(root) for f in (vit_dir, dinov2_dir, clip_dir, siglip_dir, bert_dir, gpt2_dir)}


@pytest.fixture(scope="module")
def reference(tiny):
    """The saved models, loaded without sparc."""
    return {name: AutoModel.from_pretrained(path).eval() for name, path in tiny.items()}


def extractor(tiny, arch: str, input: str, options: str = ""):
    return build_extractor(f"transformers:{tiny[arch]}{options}", input, "cpu")


def batch_of(ex, prepared, captions=None):
    """The extractor's batch of the prepared images, or of ``captions`` (default: the prepared
    captions and LONG)."""
    if ex.input == "image":
        return ex.collate([ex.load(p, "") for p in prepared.images])
    return ex.collate(list(captions or [*prepared.captions, LONG]))


def run(ex, batch) -> torch.Tensor:
    with torch.inference_mode():
        return ex.embed(batch)


def text_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "special_tokens_mask"}


def masked_mean(tokens: torch.Tensor, batch: dict, special_ids: list[int]) -> torch.Tensor:
    """Mean over the attended tokens that are not special tokens (computed from the ids)."""
    content = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], torch.tensor(special_ids))
    mask = content.unsqueeze(-1).float()
    return (tokens * mask).sum(1) / mask.sum(1)


def test_check_accepts_hub_specs_without_loading(tmp_path, capsys):
    """`python -m sparc check` validates transformers: hub specs that cannot be downloaded here."""
    from ruamel.yaml import YAML

    from sparc.cli import main
    from sparc.params import read_yaml

    raw = read_yaml(ROOT / "params.yaml")
    raw["streams"] = {
        "vit": {"model": "transformers:google/vit-base-patch16-224?layer=8&pool=mean", "input": "image"},
        "txt": {"model": "transformers:bert-base-uncased?max_length=64", "input": "caption"},
    }
    with open(tmp_path / "params.yaml", "w") as fh:
        YAML(typ="safe", pure=True).dump(raw, fh)
    assert main(["--params", str(tmp_path / "params.yaml"), "check"]) == 0
    assert "transformers:google/vit-base-patch16-224?layer=8&pool=mean (image)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arch, input, pool, dim",
    [
        ("vit", "image", "cls", 32),
        ("dinov2", "image", "cls", 32),
        ("clip", "image", "embed", 24),
        ("siglip", "image", "embed", 32),
        ("clip", "caption", "embed", 24),
        ("siglip", "caption", "embed", 32),
        ("bert", "caption", "mean", 32),
    ],
)
def test_default_features_match_the_model(tiny, reference, prepared, arch, input, pool, dim):
    """pool=auto: CLS of the final state (ViT, DINOv2), get_*_features (CLIP, SigLIP), masked mean
    without special tokens (BERT); the dimension is the model's."""
    ex = extractor(tiny, arch, input)
    assert ex.pool == pool and ex.dim == dim
    batch = batch_of(ex, prepared)
    got = run(ex, batch)
    model = reference[arch]
    with torch.inference_mode():
        if arch in ("vit", "dinov2"):
            expected = model(pixel_values=batch).last_hidden_state[:, 0]
        elif input == "image":
            expected = model.get_image_features(pixel_values=batch).pooler_output
        elif arch == "bert":
            tok = AutoTokenizer.from_pretrained(tiny["bert"])
            tokens = model(**text_inputs(batch)).last_hidden_state
            expected = masked_mean(tokens, batch, tok.all_special_ids)
        else:
            expected = model.get_text_features(**text_inputs(batch)).pooler_output
    assert got.shape == (len(batch["input_ids"]) if input == "caption" else len(prepared), dim)
    torch.testing.assert_close(got, expected)


def test_preprocessing_is_the_models_own(tiny, prepared):
    """Pixels from the saved AutoImageProcessor, tokens from the saved AutoTokenizer (padded to the
    longest, SigLIP to max_length), both recorded in the metadata."""
    from transformers import AutoImageProcessor

    from sparc.features.base import open_rgb

    ex = extractor(tiny, "dinov2", "image")
    expected = AutoImageProcessor.from_pretrained(tiny["dinov2"])(images=open_rgb(prepared.images[0]), return_tensors="pt")
    torch.testing.assert_close(ex.load(prepared.images[0], ""), expected["pixel_values"][0], rtol=0, atol=0)
    meta = ex.preprocessing()
    assert meta["image_processor"]["crop_size"] == {"height": 28, "width": 28}
    assert (meta["leading_tokens"], meta["cls_token"], meta["register_tokens"]) == (3, True, 2)
    bert = extractor(tiny, "bert", "caption")
    batch = bert.collate(["a red circle", "a cat"])
    reference_ids = AutoTokenizer.from_pretrained(tiny["bert"])(["a red circle", "a cat"], padding=True)["input_ids"]
    assert batch["input_ids"].tolist() == reference_ids
    assert bert.preprocessing()["max_length"] == 16 and bert.preprocessing()["padding"] == "longest"
    siglip = extractor(tiny, "siglip", "caption")
    assert siglip.collate(["a cat"])["input_ids"].shape == (1, 12) and siglip.preprocessing()["padding"] == "max_length"


LAYER_CASES = [
    # arch, input, pool, layer, norm module applied (None: norm=false)
    ("vit", "image", "cls", 0, None),
    ("vit", "image", "cls", 1, None),
    ("vit", "image", "mean", 2, "layernorm"),
    ("dinov2", "image", "mean", 1, None),
    ("dinov2", "image", "cls", 2, "layernorm"),
    ("clip", "image", "cls", 1, "post_layernorm"),
    ("clip", "caption", "mean", 1, "final_layer_norm"),
    ("siglip", "image", "mean", 2, None),
    ("siglip", "caption", "mean", 0, "final_layer_norm"),
    ("bert", "caption", "cls", 1, None),
]


@pytest.mark.parametrize("arch, input, pool, layer, norm", LAYER_CASES)
def test_layer_is_the_hidden_state_of_output_hidden_states(tiny, reference, prepared, arch, input, pool, layer, norm):
    """layer=N pools hidden_states[N] of output_hidden_states=True (of the input's tower for dual
    encoders), after the tower's final norm with norm=true; mean skips CLS, registers, specials."""
    options = f"?layer={layer}&pool={pool}" + ("&norm=true" if norm else "")
    ex = extractor(tiny, arch, input, options)
    batch = batch_of(ex, prepared)
    got = run(ex, batch)
    model = reference[arch]
    tower = {"image": getattr(model, "vision_model", model), "caption": getattr(model, "text_model", model)}[input]
    inputs = {"pixel_values": batch} if input == "image" else text_inputs(batch)
    with torch.inference_mode():
        states = tower(**inputs, output_hidden_states=True).hidden_states
        assert len(states) == BLOCKS + 1
        tokens = getattr(tower, norm)(states[layer]) if norm else states[layer]
    if pool == "cls":
        expected = tokens[:, 0]
    elif input == "image":
        expected = tokens[:, {"vit": 1, "dinov2": 3, "clip": 1, "siglip": 0}[arch]:].mean(dim=1)
    else:
        special = AutoTokenizer.from_pretrained(tiny[arch]).all_special_ids
        expected = masked_mean(tokens, batch, special)
    torch.testing.assert_close(got, expected)
    assert ex.preprocessing()["layer"] == layer and ex.preprocessing()["norm"] == norm


def test_decoder_only_text_model(tiny, reference):
    """GPT-2: mean over the attended tokens (it adds no special tokens; padding with its end token
    is masked), layer and final norm ln_f; no CLS token."""
    ex = extractor(tiny, "gpt2", "caption", "?layer=2&norm=true")
    batch = ex.collate(["a red circle", "a cat"])
    assert batch["input_ids"].shape == (2, 3) and batch["attention_mask"][1].tolist() == [1, 1, 0]
    with torch.inference_mode():
        states = reference["gpt2"](**text_inputs(batch), output_hidden_states=True).hidden_states
        tokens = reference["gpt2"].ln_f(states[2])
    torch.testing.assert_close(run(ex, batch), torch.stack([tokens[0].mean(0), tokens[1, :2].mean(0)]))
    with pytest.raises(ValueError, match="pool=cls but .*its first token is not a special token"):
        extractor(tiny, "gpt2", "caption", "?pool=cls")


def test_auto_pool_with_layer(tiny):
    """pool=auto with layer: CLS where the image tower has one (CLIP), else the mean (SigLIP, text)."""
    assert extractor(tiny, "clip", "image", "?layer=1").pool == "cls"
    assert extractor(tiny, "siglip", "image", "?layer=1").pool == "mean"
    assert extractor(tiny, "clip", "caption", "?layer=1").pool == "mean"


@pytest.mark.parametrize("arch", ["vit", "dinov2"])
def test_last_layer_with_norm_is_the_final_state(tiny, prepared, arch):
    final = extractor(tiny, arch, "image", "?pool=mean")
    last = extractor(tiny, arch, "image", f"?pool=mean&layer={BLOCKS}&norm=true")
    raw = extractor(tiny, arch, "image", f"?pool=mean&layer={BLOCKS}")
    batch = batch_of(final, prepared)
    torch.testing.assert_close(run(last, batch), run(final, batch))
    assert not torch.allclose(run(raw, batch), run(final, batch))


def test_pooler_options(tiny, reference, prepared):
    """pool=pooler is the tower's pooler_output, unprojected; pool=cls of CLIP is the CLS token
    before CLIP's post_layernorm (last_hidden_state as the model returns it)."""
    clip = extractor(tiny, "clip", "image", "?pool=pooler")
    bert = extractor(tiny, "bert", "caption", "?pool=pooler")
    assert clip.dim == 32 and bert.dim == 32
    pixels = batch_of(clip, prepared)
    captions = batch_of(bert, prepared)
    with torch.inference_mode():
        vision = reference["clip"].vision_model(pixel_values=pixels)
        torch.testing.assert_close(run(clip, pixels), vision.pooler_output)
        torch.testing.assert_close(run(extractor(tiny, "clip", "image", "?pool=cls"), pixels), vision.last_hidden_state[:, 0])
        torch.testing.assert_close(run(bert, captions), reference["bert"](**text_inputs(captions)).pooler_output)


def test_same_features_as_the_dinov2_family(tiny, prepared):
    """The transformers family on a DINOv2 directory gives the dinov2 family's bytes."""
    for pool in ("cls", "mean"):
        ours = extractor(tiny, "dinov2", "image", f"?pool={pool}")
        theirs = build_extractor(f"dinov2:{tiny['dinov2']}?pool={pool}", "image", "cpu")
        batch = batch_of(theirs, prepared)
        np.testing.assert_array_equal(run(ours, batch_of(ours, prepared)).numpy(), run(theirs, batch).numpy())


def test_captions_truncated_and_counted(tiny):
    """max_length cuts captions (special tokens included) and counts the ones it cut, with the fast
    tokenizer's overflow and, for other tokenizers, by encoding again."""
    ex = extractor(tiny, "bert", "caption", "?max_length=6")
    texts = ["a red circle", "a red circle stripe", "a red circle stripe cat", LONG]  # 5, 6, 7, 20 tokens
    batch, counts = ex.collate_counted(texts)
    assert batch["input_ids"].shape == (4, 6) and counts == {"truncated_captions": 2}
    tok = AutoTokenizer.from_pretrained(tiny["bert"])
    assert count_truncated(tok, texts, dict(batch), 6) == 2  # no .encodings: encoded again
    assert run(ex, batch).shape == (4, 32)
    assert extractor(tiny, "clip", "caption").collate_counted([LONG])[1] == {"truncated_captions": 1}
    assert extractor(tiny, "siglip", "caption").collate_counted(["a cat"])[1] == {"truncated_captions": 0}


def test_extract_stage_writes_features_and_counts(tiny, prepared, tmp_path):
    """Through the extract stage (a worker process): rows equal the extractor's features, meta.json
    records the spec, options and the truncation count; image streams count nothing."""
    ex = build_extractor(f"transformers:{tiny['bert']}?max_length=5&layer=1", "caption", "cpu")
    out = extract_stream(prepared, ex, tmp_path / "txt", batch_size=3, num_workers=1, progress=False)
    stream = open_stream(out)
    cut = sum(len(ids) > 5 for ids in AutoTokenizer.from_pretrained(tiny["bert"])(prepared.captions)["input_ids"])
    assert 0 < cut < len(prepared)
    assert stream.meta["counts"] == {"truncated_captions": cut}
    assert stream.meta["model"] == f"transformers:{tiny['bert']}?layer=1&max_length=5"
    assert stream.meta["preprocessing"]["pool"] == "mean" and stream.meta["preprocessing"]["max_length"] == 5
    # exact: the same batches of 3 with the stage's model thread count (model_threads(1) with one
    # loader worker), so the same computation; another thread count may round differently (issue 21)
    with cpu_threads(model_threads(1)):
        direct = torch.cat([run(ex, ex.collate(prepared.captions[i : i + 3])) for i in range(0, len(prepared), 3)])
    np.testing.assert_array_equal(np.asarray(stream.features), direct.numpy().astype(np.float16))
    image = extract_stream(prepared, extractor(tiny, "siglip", "image"), tmp_path / "img", batch_size=4, num_workers=0, progress=False)
    assert "counts" not in open_stream(image).meta


def test_hub_name_loads_from_cache_like_the_directory(tiny, prepared, tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "hub" / ("models--" + HUB_NAME.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(tiny["vit"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_name = build_extractor(f"transformers:{HUB_NAME}", "image", "cpu")
    by_dir = extractor(tiny, "vit", "image")
    batch = batch_of(by_name, prepared)
    np.testing.assert_array_equal(run(by_name, batch).numpy(), run(by_dir, batch_of(by_dir, prepared)).numpy())
    with pytest.raises(ValueError, match="transformers: cannot load the model of 'google/nope' from the local Hugging Face cache"):
        build_extractor("transformers:google/nope", "image", "cpu")


def test_pickles_without_model(tiny, prepared):
    for arch, input in (("clip", "image"), ("bert", "caption")):
        ex = extractor(tiny, arch, input)
        copy = pickle.loads(pickle.dumps(ex))
        assert copy.model is None and ex.model is not None
        if input == "image":
            torch.testing.assert_close(copy.load(prepared.images[0], ""), ex.load(prepared.images[0], ""), rtol=0, atol=0)
        else:
            assert torch.equal(copy.collate(["a cat"])["input_ids"], ex.collate(["a cat"])["input_ids"])


@pytest.mark.parametrize(
    "arch, input, options, message",
    [
        ("siglip", "image", "?pool=cls", "pool=cls but .*siglip.*it has no CLS token; use pool=mean"),
        ("vit", "image", "?pool=embed", "pool=embed needs a dual encoder"),
        ("bert", "image", "", "a 'bert' model that reads 'input_ids', not 'pixel_values'"),
        ("vit", "caption", "", "reads 'pixel_values', not 'input_ids'"),
        ("bert", "caption", "?layer=1&norm=true", "norm=true but .*has no final norm"),
        ("vit", "image", "?layer=3", "layer=3 but .* has hidden states 0..2"),
        ("bert", "caption", "?max_length=17", "max_length=17 exceeds the 16 tokens"),
        ("siglip", "caption", "?pool=pooler&layer=1", "pool=pooler reads the model's final output and takes no layer"),
        ("vit", "image", "?norm=true", "norm=true applies to layer=N"),
        ("vit", "image", "?max_length=8", "max_length applies to caption streams"),
    ],
)
def test_errors_name_the_problem(tiny, arch, input, options, message):
    with pytest.raises(ValueError, match=message):
        extractor(tiny, arch, input, options)


def test_missing_directory_and_processor(tiny, tmp_path):
    with pytest.raises(ValueError, match="transformers: model directory '/nonexistent/model' does not exist"):
        build_extractor("transformers:/nonexistent/model", "image", "cpu")
    shutil.copytree(tiny["vit"], tmp_path / "bare")
    (tmp_path / "bare" / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="cannot load the image processor of .*bare"):
        build_extractor(f"transformers:{tmp_path / 'bare'}", "image", "cpu")
