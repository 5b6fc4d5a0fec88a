"""The built-in demo model: shipped and described, official layout, and actually trained on the KJV text."""
import torch
import torch.nn.functional as F

from goose import demo, load
from goose.tokenizer import ByteTokenizer

VERSE = "Joh3:16 For God so loved the world, that he gave his only begotten Son, that whosoever believeth in him " \
        "should not perish, but have everlasting life.\n"


def test_assets_describe_the_model():
    meta = demo.info()
    model = demo.load_demo()
    assert meta["tokenizer"] == "byte" and model.config.vocab_size == ByteTokenizer().vocab_size
    assert sum(p.numel() for p in model.parameters()) == meta["parameters"]
    assert meta["corpus"]["origin"] and "public domain" in meta["corpus"]["licence"]
    assert (demo.ASSETS / meta["file"]).stat().st_size < 20 * 2**20
    assert "King James Bible" in demo.notice(meta)


def test_demo_model_knows_the_text():
    """A well-known verse costs far fewer nats per byte than the 5.55 of an untrained byte model."""
    ids = torch.tensor([ByteTokenizer().encode(VERSE)])
    with torch.no_grad():
        logits, _ = demo.load_demo()(ids[:, :-1])
    assert F.cross_entropy(logits[0], ids[0, 1:]).item() < 1.5


def test_official_package_loads_it_and_agrees(official_rwkv):
    path = demo.ASSETS / demo.info()["file"]
    ref = official_rwkv(str(path)[:-4], "cpu fp32")                  # it appends ".pth" itself
    prompt = ByteTokenizer().encode(VERSE)
    ref_logits, _ = ref.forward(prompt, None)
    with torch.no_grad():
        logits, _ = load(path)(torch.tensor([prompt]), last=True)
    assert ((logits[0] - ref_logits).abs().max() / ref_logits.std()).item() < 1e-4
