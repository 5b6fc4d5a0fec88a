"""The passkey experiment's training recipe: what each loss asks for, and stage 1 trains the attention alone."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from goose.experiments import passkey
from goose.experiments.runner import IGNORE
from goose.train.init import model_config, new_model


def _micro(steps: int = 2) -> passkey.Preset:
    quick = passkey.PRESETS["quick"]
    return dataclasses.replace(quick, train_lengths=(300,), batch_size=2,
                               train=dataclasses.replace(quick.train, steps=steps, eval_every=steps, warmup_steps=1))


def test_language_model_labels_stop_at_the_question():
    prompt_len = 300
    inputs, lm = passkey.training_batch((prompt_len,), 4, torch.Generator().manual_seed(0), recall=False)
    _, retrieval = passkey.training_batch((prompt_len,), 4, torch.Generator().manual_seed(0))
    assert inputs.shape == (4, prompt_len + passkey.ANSWER_WIDTH - 1)
    assert (lm[:, :prompt_len - 1] != IGNORE).all()          # every prompt token, the needle's repeat included
    assert (lm[:, prompt_len - 1:] == IGNORE).all()          # never the answer
    answer = retrieval[:, prompt_len - 1:]
    assert ((answer != IGNORE).sum(dim=1) >= 2).all()        # retrieval scores " <key>"
    assert ((retrieval[:, :prompt_len - 1] != IGNORE).sum(dim=1) < 60).all()   # and the needle's repeat only


def test_stage_one_trains_the_attention_blocks_alone(one_thread):
    p = _micro()
    model = passkey.expand(new_model(model_config(1, p.n_embd, passkey.TOKENIZER.vocab_size, p.head_size), 0),
                           1, passkey.SparseConfig(p.chunk_size, p.topk))
    before = {k: t.clone() for k, t in model.state_dict().items()}
    fit = passkey.train_attention(model, p, p.train, seed=0, progress=False)
    after = model.state_dict()
    assert fit.steps == 2
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("rwkv."))
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("moba."))
    assert all(t.requires_grad for t in model.parameters())   # unfrozen for stage 2


def test_grown_hybrid_records_each_stage(one_thread):
    p = dataclasses.replace(_micro(), grow=passkey.Growth(pretrain=1, stage1=1.5, stage2=0.5, stage1_lr=1e-2))
    model, stages = passkey.grow_hybrid(p, p.grow, seed=0, progress=False)
    assert [(name, fit.steps) for name, fit in stages.items()] == [
        ("language-model pretraining", 2), ("stage 1, attention only", 3), ("stage 2, all", 1)]
    assert isinstance(model, passkey.RWKVX) and model.config.rwkv.n_layer == p.n_layer - p.n_attn


def test_rwkv7_gets_as_many_passkey_steps_as_the_grown_hybrid():
    quick = passkey.PRESETS["quick"]
    grow = quick.grow
    assert passkey.matched_training(quick).steps == round((grow.stage1 + grow.stage2) * quick.train.steps)
    assert passkey.matched_training(dataclasses.replace(quick, grow=None)) == quick.train

