"""Synthetic LAION-Aesthetics-style data: realistic captions, URLs, sizes and scores, with no network.

What is modelled on the real improved_aesthetics_6plus set (from its published exploration, not copied
from it): the same columns and types; a few large hosts and a long tail of small ones, with Pinterest
(i.pinimg.com) at about 8 % of images; captions written the way those sites title images (art prints
"… Painting by ARTIST", stock photos, product listings, Pinterest pins); artist names in a few percent
of captions, a handful of print painters (Thomas Kinkade, Vincent van Gogh, Leonid Afremov, …) far ahead
of the rest; aesthetic scores of 6 and above, decaying quickly. None of it is real data.

Deterministic: the same seed gives the same rows, and `--rows N` gives the first N rows of any larger run
with the same seed (each row draws from one sequential generator; nothing depends on the total).
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Callable
from pathlib import Path

from spellbook.errors import UserError
from spellbook.explorer.text import known_artists

# (host, share of all images, caption kind). Shares approximate the shape reported for the real set.
HEAD_DOMAINS: tuple[tuple[str, float, str], ...] = (
    ("i.pinimg.com", 0.085, "pin"),
    ("render.fineartamerica.com", 0.045, "print"),
    ("images.fineartamerica.com", 0.020, "print"),
    ("us.123rf.com", 0.030, "stock"),
    ("cdn.shopify.com", 0.030, "product"),
    ("i.etsystatic.com", 0.020, "product"),
    ("thumbs.dreamstime.com", 0.012, "stock"),
    ("ae01.alicdn.com", 0.012, "product"),
    ("m.media-amazon.com", 0.010, "product"),
    ("i.ebayimg.com", 0.010, "product"),
    ("image.shutterstock.com", 0.010, "stock"),
    ("c8.alamy.com", 0.008, "stock"),
    ("photos.smugmug.com", 0.008, "photo"),
    ("live.staticflickr.com", 0.008, "photo"),
    ("images.squarespace-cdn.com", 0.008, "photo"),
    ("images.saatchiart.com", 0.006, "print"),
    ("i0.wp.com", 0.006, "blog"),
    ("media.gettyimages.com", 0.006, "stock"),
    ("1.bp.blogspot.com", 0.005, "blog"),
    ("2.bp.blogspot.com", 0.005, "blog"),
    ("cdna.artstation.com", 0.004, "fantasy"),
    ("cdnb.artstation.com", 0.004, "fantasy"),
    ("images.unsplash.com", 0.004, "photo"),
    ("i.redd.it", 0.004, "photo"),
    ("wallpaperaccess.com", 0.004, "wallpaper"),
    ("images.pexels.com", 0.003, "photo"),
    ("cdn.pixabay.com", 0.003, "photo"),
    ("www.wallpaperflare.com", 0.003, "wallpaper"),
)
TAIL_KINDS = ("blog", "blog", "product", "product", "photo", "photo", "pin", "print", "stock", "wallpaper", "fantasy")
TAIL_POOL = 400_000  # distinct long-tail hosts to draw from
TAIL_KNEE = 50  # rank offset of the tail's Zipf curve: even its largest hosts stay far below the head's

ARTIST_RATE = {
    "print": 0.35,
    "fantasy": 0.4,
    "pin": 0.04,
    "wallpaper": 0.02,
    "blog": 0.01,
    "photo": 0.005,
    "product": 0.005,
    "stock": 0.0,
}
# Print painters dominate artist mentions in the real captions; prompt favourites are rare there.
ARTIST_WEIGHTS = {
    "Thomas Kinkade": 30,
    "Vincent van Gogh": 28,
    "Leonid Afremov": 20,
    "Claude Monet": 18,
    "Justin Gaffrey": 15,
    "Erin Hanson": 12,
    "Gustav Klimt": 8,
    "Pierre-Auguste Renoir": 8,
    "Bob Ross": 6,
    "Alphonse Mucha": 6,
    "Pablo Picasso": 6,
    "Salvador Dalí": 5,
    "Katsushika Hokusai": 5,
    "Albert Bierstadt": 4,
    "John Singer Sargent": 4,
    "Greg Rutkowski": 0.05,
}

ANIMALS = (
    "otter", "sea otter", "cat", "kitten", "dog", "puppy", "fox", "red fox", "owl", "horse", "deer", "wolf",
    "bear", "rabbit", "elephant", "lion", "tiger", "hummingbird", "butterfly", "dolphin", "whale", "sea turtle",
    "penguin", "red panda", "koala", "raccoon", "squirrel", "hedgehog", "eagle", "parrot", "flamingo", "giraffe",
    "zebra", "corgi", "golden retriever", "heron", "swan", "goldfish", "highland cow", "llama",
)  # fmt: skip
LANDSCAPES = (
    "mountain lake", "forest path", "beach", "waterfall", "lavender field", "autumn forest", "snowy mountains",
    "desert", "river", "meadow", "canyon", "lighthouse", "harbor", "vineyard", "countryside", "tulip field",
    "rocky coast", "misty forest", "sunflower field", "alpine village", "cherry blossoms", "wheat field",
    "tropical island", "northern lights", "garden", "old bridge", "country road", "pond with water lilies",
)  # fmt: skip
PLACES = (
    "Paris", "Venice", "New York", "Tokyo", "London", "Santorini", "Kyoto", "Amsterdam", "Prague", "Florence",
    "Iceland", "Yosemite", "Scotland", "Tuscany", "Lake Como", "Bali", "Banff", "Provence", "Cornwall", "Maui",
)  # fmt: skip
TIMES = ("sunset", "sunrise", "dusk", "night", "golden hour", "winter", "autumn", "spring", "summer", "dawn")
ADJECTIVES = (
    "beautiful", "cozy", "vintage", "modern", "rustic", "minimalist", "colorful", "elegant", "dreamy", "abstract",
    "whimsical", "serene", "dramatic", "bohemian", "cute", "stunning", "magical", "moody", "bright", "peaceful",
)  # fmt: skip
COLORS = (
    "red", "blue", "green", "yellow", "purple", "pink", "black", "white", "teal", "gold", "navy", "emerald",
    "burgundy", "pastel", "turquoise", "orange", "grey", "sage green", "blush pink", "mustard",
)  # fmt: skip
MEDIUMS = (
    "oil painting", "watercolor painting", "acrylic painting", "digital art", "illustration", "pencil drawing",
    "charcoal drawing", "canvas print", "art print", "poster", "photograph", "ink drawing", "pastel drawing",
    "mixed media", "painting", "palette knife painting", "wall art",
)  # fmt: skip
ROOMS = (
    "living room", "bedroom", "kitchen", "bathroom", "patio", "dining room", "home office", "nursery", "entryway",
    "backyard", "reading nook", "small apartment",
)  # fmt: skip
PRODUCTS = (
    "dress", "t-shirt", "hoodie", "mug", "necklace", "ring", "earrings", "handbag", "sneakers", "throw pillow",
    "wall clock", "rug", "lamp", "phone case", "tote bag", "sweater", "scarf", "jacket", "candle", "planter",
    "wedding dress", "maxi dress", "coffee table", "bookshelf", "jigsaw puzzle", "blanket",
)  # fmt: skip
MATERIALS = (
    "cotton", "linen", "ceramic", "leather", "sterling silver", "gold", "wooden", "velvet", "wool", "glass",
    "brass", "bamboo", "handmade", "knitted", "embroidered",
)  # fmt: skip
FOODS = (
    "chocolate cake", "lemon bars", "banana bread", "chicken curry", "lasagna", "avocado toast", "smoothie bowl",
    "apple pie", "pancakes", "sushi", "tacos", "ramen", "cheesecake", "cookies", "pizza", "cinnamon rolls",
)  # fmt: skip
FANTASY = (
    "castle on a cliff", "dragon", "elven city", "knight in armor", "wizard tower", "floating islands",
    "enchanted forest", "spaceship", "cyberpunk city", "ancient temple", "sorceress", "samurai", "mermaid",
    "post-apocalyptic city", "haunted mansion", "steampunk airship", "fairy", "viking warrior", "space station",
    "crystal cave", "dark forest", "portrait of a warrior princess",
)  # fmt: skip
PEOPLE = (
    "young woman", "man", "couple", "family", "little girl", "businessman", "bride", "old man", "teenager",
    "mother and child", "woman", "boy", "senior couple", "chef", "doctor",
)  # fmt: skip
ACTIONS = (
    "walking", "smiling", "reading a book", "drinking coffee", "laughing", "running", "sitting", "holding flowers",
    "looking at camera", "dancing", "working on laptop", "hiking",
)  # fmt: skip
PIN_ENDINGS = ("Ideas", "Ideas You'll Love", "Inspiration", "Decor Ideas", "DIY Projects", "Tips", "on a Budget")
TAIL_WORDS = (
    "art", "blue", "sky", "home", "studio", "design", "photo", "garden", "craft", "shop", "style", "life",
    "green", "house", "paper", "moon", "sun", "wild", "little", "happy", "north", "pixel", "maker", "travel",
    "vintage", "fresh", "urban", "daily", "pretty", "simple", "cozy", "golden", "silver", "ocean", "forest",
    "city", "dream", "print", "gallery", "market", "store", "kitchen", "wedding", "decor", "fashion", "pet",
    "nature", "color", "light", "stone", "river", "maple", "pine", "rose", "fox", "owl", "bee", "mountain",
)  # fmt: skip
TAIL_PATTERNS = (
    "www.{a}{b}.com", "{a}{b}.com", "cdn.{a}{b}.com", "images.{a}{b}.com", "www.{a}-{b}.co.uk", "{a}{b}.files.wordpress.com",
    "www.{a}{b}.net", "static.{a}{b}.com", "www.{a}{b}.de", "{a}{b}shop.com", "www.the{a}{b}.com", "img.{a}{b}.fr",
)  # fmt: skip
SYLLABLES = (
    "ka", "lo", "mi", "ra", "ven", "tor", "el", "an", "is", "bel", "mar", "den", "sol", "ri", "ca", "no", "va",
    "lin", "thu", "ber", "gar", "ro", "sen", "ta", "fi", "ly", "dor", "ma", "quin", "zen", "pa", "ne", "vi", "ho",
    "ster", "wick", "ford", "ton", "ley", "mo",
)  # fmt: skip
# Real captions are full of names (shops, places, products, people) that occur a handful of times each;
# they make the search index's vocabulary, and so its size, realistic. Drawn like the tail domains.
NAME_POOL = 2_000_000
NAME_KNEE = 20
DETAIL_RATE = 0.55  # captions with a detail (name, size, year, model number) after the core text
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October")
_SLUG = re.compile(r"[^a-z0-9]+")


def proper_noun(index: int) -> str:
    """Name number `index` ("Kalo", "Venmarden", …): a pure function of the index."""
    n = len(SYLLABLES)
    parts = [SYLLABLES[index % n], SYLLABLES[(index // n) % n]]
    rest = index // (n * n)
    while rest:
        parts.append(SYLLABLES[rest % n])
        rest //= n
    return "".join(parts).capitalize()


def tail_domain(index: int) -> str:
    """The long-tail host number `index`: a pure function of the index, so no pool is held in memory."""
    n = len(TAIL_WORDS)
    a = TAIL_WORDS[index % n]
    b = TAIL_WORDS[(index // n) % n]
    pattern = TAIL_PATTERNS[(index // (n * n)) % len(TAIL_PATTERNS)]
    number = index // (n * n * len(TAIL_PATTERNS))
    return pattern.format(a=a, b=b + (str(number) if number else ""))


class CaptionMaker:
    def __init__(self, rng: random.Random):
        self.rng = rng
        artists = known_artists()
        order = list(artists)
        random.Random(1).shuffle(order)  # a fixed order for the tail of the artist distribution
        weights = [ARTIST_WEIGHTS.get(a.name, 1.5 / (rank + 3)) for rank, a in enumerate(order)]
        self.artists = order
        self.artist_cum = []
        total = 0.0
        for w in weights:
            total += w
            self.artist_cum.append(total)

    def artist(self) -> str:
        rng = self.rng
        artist = rng.choices(self.artists, cum_weights=self.artist_cum)[0]
        if len(artist.spellings) > 1 and rng.random() < 0.3:
            return rng.choice(artist.spellings[1:])
        return artist.name

    def name(self) -> str:
        return proper_noun(int(NAME_KNEE * ((NAME_POOL / NAME_KNEE + 1) ** self.rng.random() - 1)))

    def caption(self, kind: str) -> str:
        text = self.core_caption(kind)
        if self.rng.random() >= DETAIL_RATE:
            return text
        rng, c = self.rng, self.rng.choice
        if kind == "product":
            return text + c(
                (
                    f" - {self.name()} {c(('Store', 'Shop', 'Studio', 'Co', 'Design'))}",
                    f", Size {c(('S', 'M', 'L', 'XL', 'Small', 'Large'))}",
                    f" {rng.randint(10, 99)}x{rng.randint(10, 99)} cm",
                    f" Model {self.name()[:3].upper()}-{rng.randint(100, 9999)}",
                )
            )
        if kind == "print":
            return text + c(
                (
                    f" - {self.name()} Collection",
                    f", {rng.randint(8, 40)} x {rng.randint(8, 40)} in",
                    f" ({rng.randint(1850, 2021)})",
                )
            )
        if kind == "stock":
            return text + c((f" in {self.name()}", f", image {rng.randint(10**6, 10**8)}"))
        if kind in ("fantasy", "wallpaper"):
            return text + c((f", {self.name()}", f" - {self.name()} {self.name()}"))
        return text + c(
            (
                f" | {self.name()} {c(('Blog', 'Journal', 'Home', 'Kitchen', 'Life', 'Designs'))}",
                f" in {self.name()}",
                f" ({c(MONTHS)} {rng.randint(2008, 2021)})",
            )
        )

    def core_caption(self, kind: str) -> str:
        rng, c = self.rng, self.rng.choice
        with_artist = rng.random() < ARTIST_RATE[kind]
        if kind == "print":
            subject = c(
                (
                    f"{c(LANDSCAPES).title()} at {c(TIMES).title()}",
                    f"{c(ADJECTIVES).title()} {c(ANIMALS).title()}",
                    f"{c(PLACES)} {c(TIMES).title()}",
                    f"{c(COLORS).title()} {c(LANDSCAPES).title()}",
                    f"Still Life With {c(('Sunflowers', 'Roses', 'Peonies', 'Lemons', 'Irises', 'Tulips'))}",
                )
            )
            if with_artist:
                return c(
                    (
                        f"{subject} Painting by {self.artist()}",
                        f"{subject} by {self.artist()}",
                        f"{self.artist()} - {subject} {c(MEDIUMS).title()}",
                        f"{subject} {c(MEDIUMS).title()} by {self.artist()}",
                    )
                )
            return c((f"{subject} {c(MEDIUMS).title()}", f"{subject} Art Print", f"{subject} Poster"))
        if kind == "fantasy":
            subject = f"{c(('', 'a ', 'the ', 'an epic '))}{c(FANTASY)}"
            text = c((subject, f"{subject}, {c(MEDIUMS)}", f"{subject} at {c(TIMES)}", f"concept art of {subject}"))
            if with_artist:
                text = c((f"{text} by {self.artist()}", f"{text}, {self.artist()}"))
            if rng.random() < 0.05:
                text += ", trending on artstation"
            return text
        if kind == "pin":
            pick = rng.random()
            if pick < 0.3:
                return f"{rng.randint(5, 50)} {c(ADJECTIVES).title()} {c(ROOMS).title()} {c(PIN_ENDINGS)}"
            if pick < 0.5:
                return f"{c(COLORS)} {c(PRODUCTS)} outfit ideas for {c(TIMES)}"
            if pick < 0.65:
                return f"The Best {c(FOODS).title()} Recipe - {c(('Easy', 'Healthy', 'Quick', 'Homemade'))}"
            text = f"{c(ADJECTIVES)} {c(ANIMALS)} {c(MEDIUMS)}"
            return f"{text} by {self.artist()}" if with_artist else text
        if kind == "stock":
            return c(
                (
                    f"{c(PEOPLE)} {c(ACTIONS)} in {c(PLACES)} stock photo",
                    f"Stock Photo - {c(ADJECTIVES)} {c(LANDSCAPES)} at {c(TIMES)}",
                    f"{c(ANIMALS)} isolated on white background",
                    f"portrait of a {c(ADJECTIVES)} {c(PEOPLE)} {c(ACTIONS)}",
                    f"{c(ANIMALS)} on {c(COLORS)} background, vector illustration",
                    f"Close-up of {c(FOODS)} on a wooden table",
                )
            )
        if kind == "product":
            text = c(
                (
                    f"{c(('Women', 'Men', 'Kids'))}'s {c(MATERIALS).title()} {c(COLORS).title()} {c(PRODUCTS).title()}",
                    f"{c(ADJECTIVES).title()} {c(MATERIALS).title()} {c(PRODUCTS).title()} - {c(COLORS).title()}",
                    f"{c(ANIMALS).title()} {c(PRODUCTS).title()}, {c(ADJECTIVES)} gift for {c(ANIMALS)} lovers",
                    f"{c(PRODUCTS).title()} {c(('Set', 'Bundle', 'Pack of 2', 'Large', 'Mini'))}",
                )
            )
            return f"{self.artist()} {text}" if with_artist else text
        if kind == "photo":
            return c(
                (
                    f"{c(LANDSCAPES)} at {c(TIMES)}",
                    f"{c(ANIMALS)} in the {c(LANDSCAPES)}",
                    f"{c(PLACES)} at {c(TIMES)}",
                    f"Wedding at {c(LANDSCAPES)} in {c(PLACES)}",
                    f"{c(ADJECTIVES)} {c(ANIMALS)} photograph",
                )
            )
        if kind == "wallpaper":
            return c(
                (
                    f"{c(ADJECTIVES).title()} {c(LANDSCAPES).title()} HD Wallpaper",
                    f"{c(FANTASY).title()} Wallpaper 4K",
                    f"{c(ANIMALS).title()} Wallpaper",
                )
            )
        # blog
        return c(
            (
                f"{c(ADJECTIVES)} {c(ROOMS)} with {c(MATERIALS)} {c(PRODUCTS)}",
                f"{rng.randint(5, 30)} best things to do in {c(PLACES)}",
                f"how to make {c(FOODS)}",
                f"our trip to {c(PLACES)} in {c(TIMES)}",
                f"{c(ADJECTIVES)} {c(ANIMALS)} {c(MEDIUMS)}",
            )
        )


def _size(rng: random.Random, kind: str) -> tuple[float, float]:
    if kind == "pin":
        width = rng.choice((736.0, 736.0, 736.0, 564.0, 474.0))
        return width, float(int(width * rng.uniform(0.75, 2.2)))
    if kind == "product":
        side = rng.choice((800.0, 1000.0, 1024.0, 1500.0, 2048.0, 794.0))
        return side, side if rng.random() < 0.7 else float(int(side * rng.uniform(0.8, 1.4)))
    if kind == "stock":
        long, ratio = rng.choice((450.0, 1300.0, 1000.0, 800.0)), rng.choice((1.5, 1.5, 1.333, 1.0))
        return (long, float(int(long / ratio))) if rng.random() < 0.7 else (float(int(long / ratio)), long)
    width, height = rng.choice(
        ((1024, 683), (2048, 1365), (1600, 1067), (800, 533), (1920, 1080), (1200, 1600), (900, 1200), (640, 640))
    )
    if rng.random() < 0.3:
        width, height = height, width
    return float(width), float(height)


def _url(rng: random.Random, host: str, kind: str, caption: str) -> str:
    slug = _SLUG.sub("-", caption.lower()).strip("-")[:60]
    token = f"{rng.getrandbits(128):032x}"
    if host == "i.pinimg.com":
        return f"https://i.pinimg.com/736x/{token[:2]}/{token[2:4]}/{token[4:6]}/{token}.jpg"
    if kind == "print":
        return f"https://{host}/images/artworkimages/mediumlarge/{rng.randint(1, 3)}/{slug}.jpg"
    if kind == "stock":
        return f"https://{host}/450wm/{token[:8]}/{token[8:14]}/{slug}-{rng.randint(10**7, 10**8)}.jpg"
    if kind == "product":
        return f"https://{host}/s/files/1/{rng.randint(1000, 9999)}/products/{slug}_1024x1024.jpg?v={token[:10]}"
    return f"https://{host}/wp-content/uploads/{rng.randint(2009, 2021)}/{rng.randint(1, 12):02d}/{slug}.jpg"


def synthetic_rows(seed: int):
    """Endless generator of LAION-style rows (dicts with the parquet column names)."""
    rng = random.Random(seed)
    maker = CaptionMaker(rng)
    head_total = sum(share for _, share, _ in HEAD_DOMAINS)
    hosts = [h for h, _, _ in HEAD_DOMAINS]
    kinds = {h: kind for h, _, kind in HEAD_DOMAINS}
    cum, total = [], 0.0
    for _, share, _ in HEAD_DOMAINS:
        total += share
        cum.append(total)
    index = 0
    while True:
        draw = rng.random()
        if draw < head_total:
            host = hosts[bisect.bisect_right(cum, draw)]
            kind = kinds[host]
        else:
            # Zipf-like (probability ~ 1 / (rank + TAIL_KNEE)), drawn by inverting its continuous form.
            tail = int(TAIL_KNEE * ((TAIL_POOL / TAIL_KNEE + 1) ** rng.random() - 1))
            host = tail_domain(tail)
            kind = TAIL_KINDS[tail % len(TAIL_KINDS)]
        caption = maker.caption(kind)
        width, height = _size(rng, kind)
        index += 1 + int(rng.random() * 300)
        yield {
            "URL": _url(rng, host, kind, caption),
            "TEXT": caption,
            "WIDTH": width,
            "HEIGHT": height,
            "similarity": min(0.6, max(0.15, rng.gauss(0.33, 0.045))),
            "punsafe": rng.random() ** 6 * 0.5,
            "pwatermark": rng.random() ** 2,
            "AESTHETIC_SCORE": 6.0 + min(rng.expovariate(2.8), 2.9),
            "hash": rng.getrandbits(64) - 2**63,
            "__index_level_0__": index,
        }


def write_synthetic(
    out: Path | str,
    rows: int,
    *,
    seed: int = 0,
    row_group_rows: int = 100_000,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `rows` synthetic rows to the parquet file `out` (row groups of `row_group_rows`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if rows < 1:
        raise UserError(f"rows must be at least 1, got {rows}", field="rows")
    if row_group_rows < 1:
        raise UserError(f"row group size must be at least 1, got {row_group_rows}", field="row_group_rows")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("URL", pa.string()),
            ("TEXT", pa.string()),
            ("WIDTH", pa.float64()),
            ("HEIGHT", pa.float64()),
            ("similarity", pa.float64()),
            ("punsafe", pa.float32()),
            ("pwatermark", pa.float32()),
            ("AESTHETIC_SCORE", pa.float32()),
            ("hash", pa.int64()),
            ("__index_level_0__", pa.int64()),
        ],
        metadata={b"spellbook_synthetic": b"true", b"spellbook_seed": str(seed).encode()},
    )
    generator = synthetic_rows(seed)
    names = schema.names
    partial = out.with_name(out.name + ".partial")
    written = 0
    # Written under another name and renamed at the end: a killed run never leaves a valid-looking file.
    with pq.ParquetWriter(partial, schema) as writer:
        while written < rows:
            n = min(row_group_rows, rows - written)
            columns = {name: [] for name in names}
            for _ in range(n):
                row = next(generator)
                for name in names:
                    columns[name].append(row[name])
            writer.write_table(pa.table(columns, schema=schema), row_group_size=n)
            written += n
            if progress:
                progress(written, rows)
    partial.replace(out)
    return out
