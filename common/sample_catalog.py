"""The shipped sample catalogue: real Fashion-MNIST train images with GENERATED titles, brands, colours and prices."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

from common import fashion_mnist
from common.errors import ConfigError

log = logging.getLogger(__name__)

#: Display names in Fashion-MNIST label order (the published "T-shirt/top" reads badly in a shop).
CATEGORY_NAMES: tuple[str, ...] = (
    "T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Invented brand names with a price multiplier each (so brand and price band correlate, as in real shops).
BRANDS: dict[str, float] = {
    "Maison Lumen": 1.6, "Atelier Sol": 1.4, "Velvet Hare": 1.3, "Calloway & Finch": 1.25,
    "Noir": 1.15, "Fjordline": 1.05, "Tessera": 1.0, "Ondine": 0.95,
    "Kestrel": 0.9, "Brume": 0.85, "Mira Mira": 0.75, "Pebble & Co": 0.65,
}
COLORS: tuple[str, ...] = (
    "black", "white", "grey", "navy", "beige", "camel", "olive", "burgundy",
    "red", "blue", "pink", "green", "brown", "cream",
)
_COLOR_WEIGHTS = np.array([14, 9, 10, 8, 6, 4, 4, 3, 4, 6, 3, 3, 5, 4], dtype=float)
#: Per category: (nouns for titles, materials, median price in EUR).
_CATEGORY_SPECS: dict[str, tuple[tuple[str, ...], tuple[str, ...], float]] = {
    "T-shirt": (("tee", "T-shirt", "crew-neck tee", "boxy top"), ("cotton", "organic cotton", "jersey", "linen"), 19),
    "Trouser": (("trousers", "chinos", "slim trousers", "wide-leg trousers"),
                ("cotton twill", "wool blend", "denim", "linen"), 49),
    "Pullover": (("pullover", "jumper", "knit sweater", "crew-neck pullover"),
                 ("wool", "merino", "cashmere blend", "cotton knit"), 45),
    "Dress": (("dress", "midi dress", "shift dress", "wrap dress"), ("viscose", "cotton", "silk", "linen"), 59),
    "Coat": (("coat", "overcoat", "parka", "trench coat"), ("wool", "down", "cotton gabardine", "recycled polyester"),
             129),
    "Sandal": (("sandals", "strappy sandals", "slides", "flat sandals"), ("leather", "suede", "rubber"), 39),
    "Shirt": (("shirt", "oxford shirt", "button-down shirt", "blouse"),
              ("cotton poplin", "linen", "oxford cotton", "flannel"), 35),
    "Sneaker": (("sneakers", "trainers", "low-top sneakers", "runners"), ("canvas", "leather", "mesh", "suede"), 79),
    "Bag": (("bag", "tote bag", "crossbody bag", "shoulder bag"), ("leather", "canvas", "nylon", "vegan leather"), 69),
    "Ankle boot": (("ankle boots", "Chelsea boots", "lace-up ankle boots", "heeled ankle boots"),
                   ("leather", "suede", "nubuck"), 99),
}
_ADJECTIVES: tuple[str, ...] = ("Classic", "Relaxed", "Everyday", "Tailored", "Essential", "Soft", "Structured",
                                "Minimal")
_TITLE_TEMPLATES: tuple[str, ...] = (
    "{brand} {noun} in {color}",
    "{Color} {material} {noun} by {brand}",
    "{adjective} {color} {noun} - {brand}",
    "{brand} {adj} {noun}, {color}",
)
_DESCRIPTION_TEMPLATES: tuple[str, ...] = (
    "{Adj} {noun} in {color} {material} from {brand}, made to wear season after season.",
    "{brand}'s {adj} {noun} in {material}, shown here in {color}; easy to pair with the rest of your wardrobe.",
    "{Adj} {noun} by {brand}, cut from {material} in a {color} shade for an easy fit.",
)
PRICE_SIGMA = 0.3  # lognormal spread of prices around each category median


def select_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted train indices: ``per_class`` drawn without replacement from every label, deterministic in seed."""
    rng = np.random.default_rng([seed, 0])
    chosen = []
    for label in range(len(CATEGORY_NAMES)):
        pool = np.flatnonzero(labels == label)
        if len(pool) < per_class:
            raise ConfigError(f"per_class must be at most {len(pool)} for label {label}. Got {per_class}")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def _describe(category: str, rng: np.random.Generator) -> dict[str, object]:
    """GENERATED attributes of one item of ``category``: title, description, brand, color, price, stock, material."""
    nouns, materials, median = _CATEGORY_SPECS[category]
    brand = str(rng.choice(list(BRANDS)))
    color = str(rng.choice(COLORS, p=_COLOR_WEIGHTS / _COLOR_WEIGHTS.sum()))
    noun, material = str(rng.choice(nouns)), str(rng.choice(materials))
    adjective = str(rng.choice(_ADJECTIVES))
    title = str(rng.choice(_TITLE_TEMPLATES)).format(
        brand=brand, noun=noun, color=color, Color=color.capitalize(), material=material, adjective=adjective,
        adj=adjective.lower())
    description = str(rng.choice(_DESCRIPTION_TEMPLATES)).format(
        brand=brand, noun=noun, color=color, material=material, adj=adjective.lower(), Adj=adjective)
    price = round(float(median * BRANDS[brand] * rng.lognormal(0.0, PRICE_SIGMA)), 2)
    return {"title": title[0].upper() + title[1:], "description": description, "category": category,
            "brand": brand, "color": color, "price": price, "in_stock": bool(rng.random() < 0.9),
            "material": material}


def sample_table(indices: np.ndarray, labels: np.ndarray, seed: int) -> pa.Table:
    """The catalogue rows for the chosen train ``indices`` (image paths relative: images/<item_id>.png)."""
    rng = np.random.default_rng([seed, 1])
    rows = []
    for index in indices:
        item_id = f"fm-{int(index):06d}"
        row = {"item_id": item_id, **_describe(CATEGORY_NAMES[int(labels[index])], rng)}
        rows.append({**row, "image": f"images/{item_id}.png"})
    schema = pa.schema([("item_id", pa.string()), ("title", pa.string()), ("description", pa.string()),
                        ("category", pa.string()), ("brand", pa.string()), ("color", pa.string()),
                        ("price", pa.float64()), ("in_stock", pa.bool_()), ("image", pa.string()),
                        ("material", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def _write_images(images: np.ndarray, indices: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"fm-{int(i):06d}.png" for i in indices}
    for stale in folder.glob("fm-*.png"):  # a re-run with other settings must not leave old images behind
        if stale.name not in wanted:
            stale.unlink()
    for index in indices:
        Image.fromarray(images[index]).save(folder / f"fm-{int(index):06d}.png", optimize=True)


def build_sample_catalog(out_dir: Path, per_class: int = 200, seed: int = 0) -> pa.Table:
    """Write ``out_dir/images/*.png``, ``catalog.parquet`` and ``catalog.csv``; return the catalogue table.

    Images are real Fashion-MNIST *train* images (28x28 grey, unchanged), ``per_class`` per class, chosen
    deterministically from ``seed``; item ids are ``fm-<train index:06d>``. Every other field is GENERATED.
    """
    if per_class < 1:
        raise ConfigError(f"per_class must be a positive integer. Got {per_class}")
    out_dir = Path(out_dir)
    images, labels = fashion_mnist.load("train")
    indices = select_indices(labels, per_class, seed)
    table = sample_table(indices, labels, seed)
    _write_images(images, indices, out_dir / "images")
    pq.write_table(table, out_dir / "catalog.parquet", compression="zstd")
    pacsv.write_csv(table, out_dir / "catalog.csv")
    log.info("wrote sample catalogue of %d items to %s", table.num_rows, out_dir)
    return table
