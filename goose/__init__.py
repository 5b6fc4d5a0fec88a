"""goose: a toolkit for the RWKV-7 "Goose" language-model architecture.

    import goose, torch
    model = goose.load("model.pth", device="cpu", dtype=torch.float32)
    state = model.new_state(batch_size=2)
    logits, state = model(tokens, state)            # tokens [B, T] -> logits [B, T, V]
    tok = goose.WorldTokenizer()
"""
from .checkpoint import CheckpointError, load, save
from .model import ModelConfig, RWKV7
from .state import State
from .tokenizer import ByteTokenizer, StreamDecoder, WorldTokenizer, get_tokenizer, tokenizer_for_vocab

__version__ = "0.1.0"

__all__ = ["ByteTokenizer", "CheckpointError", "ModelConfig", "RWKV7", "State", "StreamDecoder",
           "WorldTokenizer", "get_tokenizer", "load", "save", "tokenizer_for_vocab"]
