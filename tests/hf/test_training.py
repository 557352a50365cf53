"""IVLForCausalLM: fused loss and gradients against a naive loss; frozen base; plain loop, Trainer, PEFT."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from ivl_kernels.hf import IVLForCausalLM  # noqa: E402
from ivl_kernels.hf._common import position_ids_from_mask  # noqa: E402

from ._models import (BASE_VOCAB, left_pad, make_base, make_value, random_map, random_prompts, remap,  # noqa: E402
                      value_input_ids)


def _batch(seed=41, lengths=(9, 5, 12, 7)):
    ids, mask = left_pad(random_prompts(list(lengths), seed=seed))
    labels = ids.clone()
    labels[0, -2] = -100  # an explicitly ignored label
    return ids, mask, labels


def naive_loss(base, value, ids, mask, labels, *, alpha, l1_coef, vmap, l1_reduction="kept"):
    """CE(base_logits + alpha * remap(value_logits)) over shifted, kept labels + IVL's L1 term, averaged over the
    positions with a kept label (``"kept"``) or over all ``B * T`` positions (``"all"``; left padding here, so
    the mask-derived positions are the module's at every position)."""
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        zb = base(ids, attention_mask=mask, position_ids=pos).logits
    vl = value(value_input_ids(ids, vmap, value.config.vocab_size), attention_mask=mask, position_ids=pos).logits
    z = zb + alpha * remap(vl, vmap, zb.shape[-1])
    # A position predicts the next label only when both are real tokens (left padding: the last pad does not
    # predict the first real token).
    target = labels[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100).reshape(-1)
    zz, vv = z[:, :-1].reshape(-1, z.shape[-1]), vl[:, :-1].reshape(-1, vl.shape[-1])
    kept = target != -100
    ce = F.cross_entropy(zz, target, ignore_index=-100)
    if l1_reduction == "all":
        l1 = (vl.abs().sum(-1) / vl.shape[-1]).mean()
    else:
        l1 = (vv[kept].abs().sum(-1) / vv.shape[-1]).mean()
    return ce + l1_coef * l1


@pytest.mark.parametrize("tie_value,kind,alpha,l1,l1_reduction", [
    pytest.param(True, "identity-tail", 1.0, 1.0, "kept", id="value-tied-identity-tail-l1kept"),
    pytest.param(False, "random-map", 0.5, 0.0, "kept", id="value-untied-random-map-alpha0.5"),
    pytest.param(False, "random-map", 0.5, 0.7, "all", id="value-untied-random-map-alpha0.5-l1all"),
])
def test_loss_and_gradients_equal_naive(tie_value, kind, alpha, l1, l1_reduction):
    base, value = make_base(tie=True), make_value(tie=tie_value)
    vmap = None if kind == "identity-tail" else random_map()
    ids, mask, labels = _batch()
    model = IVLForCausalLM(base, value, alpha=alpha, l1_coef=l1, l1_reduction=l1_reduction, vocab_map=vmap)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    got = {n: p.grad.clone() for n, p in value.named_parameters()}
    value.zero_grad()
    expected = naive_loss(base, value, ids, mask, labels, alpha=alpha, l1_coef=l1, vmap=vmap,
                          l1_reduction=l1_reduction)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for n, p in value.named_parameters():
        # fp32 models: gradients summed over many tokens cancel, so compare in norm, not elementwise.
        err = (got[n] - p.grad).norm().item()
        assert err <= 1e-4 * p.grad.norm().item() + 1e-7, f"{n}: |diff| {err:.3g} vs |grad| {p.grad.norm():.3g}"
    assert all(p.grad is None for p in base.parameters())


def test_left_and_right_padding_give_the_same_loss():
    """Labels = ids with -100 on padding: the rows scored are the real token pairs whatever the padding side (the
    last pad of a left-padded row must not be scored on the row's first real token)."""
    base, value = make_base(), make_value()
    model = IVLForCausalLM(base, value, alpha=0.5, l1_coef=0.3, l1_reduction="kept")
    prompts = random_prompts([9, 5, 12], seed=8)
    ids, mask = left_pad(prompts)
    right = torch.zeros_like(ids)
    right_mask = torch.zeros_like(mask)
    for i, p in enumerate(prompts):
        right[i, :p.shape[0]], right_mask[i, :p.shape[0]] = p, 1
    losses = [model(input_ids=x, attention_mask=m, labels=x.masked_fill(m == 0, -100)).loss
              for x, m in ((ids, mask), (right, right_mask))]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    one = torch.tensor([[0, 0, 0, 5, 6, 7, 8]])
    only_first = torch.full_like(one, -100)
    only_first[0, 3] = 5  # the first real token: no real position predicts it
    loss = model(input_ids=one, attention_mask=(one != 0).long(), labels=only_first).loss
    assert loss.item() == 0.0


def test_defaults_reproduce_released_training_and_l1_reduction_is_checked():
    base, value = make_base(), make_value()
    model = IVLForCausalLM(base, value)
    assert (model.alpha, model.l1_coef, model.l1_reduction) == (1.0, 1.0, "all")
    with pytest.raises(ValueError, match=r"l1_reduction must be one of \('kept', 'all'\)"):
        IVLForCausalLM(base, value, l1_reduction="mean")


def test_base_is_frozen_and_stays_in_eval_mode():
    base, value = make_base(), make_value()
    model = IVLForCausalLM(base, value)
    model.train()
    assert not base.training and value.training
    assert not any(p.requires_grad for p in base.parameters())
    assert all(p.requires_grad for p in value.parameters())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in value.parameters()}


def test_without_labels_returns_guided_logits():
    base, value = make_base(), make_value()
    ids, mask, _ = _batch()
    out = IVLForCausalLM(base, value, alpha=0.5)(input_ids=ids, attention_mask=mask)
    assert out.loss is None and out.logits.shape == (*ids.shape, BASE_VOCAB)
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        ref = base(ids, attention_mask=mask, position_ids=pos).logits + 0.5 * remap(
            value(value_input_ids(ids, None, 256), attention_mask=mask, position_ids=pos).logits, None, BASE_VOCAB)
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], ref[keep], rtol=1e-4, atol=1e-4)


def _train_plain(model, ids, mask, labels, steps=15, lr=3e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_plain_loop_reduces_loss_and_save_load_roundtrip(tmp_path):
    base, value = make_base(), make_value()
    ids, mask, labels = _batch()
    model = IVLForCausalLM(base, value, l1_coef=0.1)
    losses = _train_plain(model, ids, mask, labels)
    assert losses[-1] < 0.8 * losses[0]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    model.save_pretrained(tmp_path / "value")
    assert not any("base_model" in f.name for f in (tmp_path / "value").iterdir())
    loaded = IVLForCausalLM.from_pretrained(base, str(tmp_path / "value"), l1_coef=0.1)
    loaded.eval()
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(before, after)
    assert type(loaded.value_model).__name__ == "Qwen2ForCausalLM"


def test_trainer_steps_reduce_loss(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate, which is not installed")
    from transformers import Trainer, TrainingArguments

    base, value = make_base(), make_value()
    ids, mask, labels = _batch(lengths=(10, 10, 10, 10))

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            j = i % 4
            return {"input_ids": ids[j], "attention_mask": mask[j], "labels": labels[j]}

    model = IVLForCausalLM(base, value)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12,
                             learning_rate=3e-3, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=DS())
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 12 and logged[-1] < logged[0]
    with torch.no_grad():
        last = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert last < 0.8 * first
    assert not base.training


@pytest.mark.parametrize("l1_reduction", ["kept", "all"])
def test_num_items_in_batch_scales_each_micro_batch_by_its_share_of_the_kept_targets(l1_reduction):
    """Two micro-batches with different kept counts: with num_items_in_batch = both counts, the losses (and
    gradients) sum to the mean over both batches' kept targets ("kept"), or for "all" the cross-entropy mean plus
    each batch's L1 mean weighted by its share of the kept targets."""
    from ivl_kernels.hf.training import num_kept_targets

    base, value = make_base(), make_value()
    model = IVLForCausalLM(base, value, alpha=0.5, l1_coef=0.7, l1_reduction=l1_reduction, vocab_map=random_map())
    prompts = random_prompts([11, 4, 9, 6, 13], seed=21)
    parts = [prompts[:2], prompts[2:]]
    batches = []
    for rows in parts:
        ids, mask = left_pad(rows)
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, -3:] = -100  # masked targets: the kept counts are not proportional to the lengths
        batches.append((ids, mask, labels))
    kept = [int(num_kept_targets(lab, m)) for _, m, lab in batches]
    assert kept[0] != kept[1] and kept == [sum(r.shape[0] - 1 for r in rows) - 3 for rows in parts]
    total = sum(kept)
    mean = [model(input_ids=i, attention_mask=m, labels=lab).loss for i, m, lab in batches]
    value.zero_grad()
    scaled = [model(input_ids=i, attention_mask=m, labels=lab, num_items_in_batch=torch.tensor(total)).loss
              for i, m, lab in batches]
    sum(scaled).backward()
    accumulated = {n: p.grad.clone() for n, p in value.named_parameters()}
    for k, a, b in zip(kept, mean, scaled):
        torch.testing.assert_close(b, a * k / total)
    # The whole batch at once: the mean over all kept targets (rows scored alone, whatever the padding).
    ids, mask = left_pad(prompts)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, -3:] = -100
    labels[2, -3:] = -100
    assert int(num_kept_targets(labels, mask)) == total
    value.zero_grad()
    whole = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    if l1_reduction == "kept":
        whole.backward()
        torch.testing.assert_close(sum(scaled), whole, rtol=1e-5, atol=1e-6)
        for n, p in value.named_parameters():
            err = (accumulated[n] - p.grad).norm().item()
            assert err <= 1e-4 * p.grad.norm().item() + 1e-7, f"{n}: |diff| {err:.3g} vs |grad| {p.grad.norm():.3g}"
    else:  # the "all" L1 term is a per-batch mean over positions (padding included): weighted, not pooled
        ce = IVLForCausalLM(base, value, alpha=0.5, l1_coef=0.0, vocab_map=model.vocab_map)
        ce_whole = ce(input_ids=ids, attention_mask=mask, labels=labels).loss
        l1_parts = [m - ce(input_ids=i, attention_mask=ma, labels=lab).loss for m, (i, ma, lab) in zip(mean, batches)]
        expected = ce_whole + sum(l1 * k / total for l1, k in zip(l1_parts, kept))
        torch.testing.assert_close(sum(scaled), expected, rtol=1e-5, atol=1e-6)
    # No kept target in a micro-batch: it adds nothing (its "all" L1 term included).
    none = batches[0][2].clone().fill_(-100)
    zero = model(input_ids=batches[0][0], attention_mask=batches[0][1], labels=none, num_items_in_batch=total).loss
    assert zero.item() == 0.0


def _train_two_rows(tmp_path, name, trainer_cls, batch_size, grad_accum, rows):
    from transformers import TrainingArguments

    base, value = make_base(), make_value()
    model = IVLForCausalLM(base, value, alpha=0.5, l1_coef=0.3, l1_reduction="kept")

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    from ivl_kernels.hf.train_data import IVLDataCollator

    args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=grad_accum, max_steps=1, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                             remove_unused_columns=False)
    trainer = trainer_cls(model=model, args=args, train_dataset=DS(), data_collator=IVLDataCollator())
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {n: p.detach().clone() for n, p in value.named_parameters()}, logged[0]


def test_trainer_gradient_accumulation_is_token_weighted(tmp_path):
    """One optimizer step over two rows of different lengths: as two accumulated micro-batches of one row, IVLTrainer
    gives the step of the whole batch (same loss logged, same SGD update); transformers' own averaging of the
    micro-batches' means, which the plain Trainer applies to this model, does not."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate, which is not installed")
    from transformers import Trainer

    from ivl_kernels.hf.trainer import IVLTrainer

    g = torch.Generator().manual_seed(4)
    rows = []
    for n, masked in ((14, 2), (5, 0)):
        ids = torch.randint(2, BASE_VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[:masked] = -100  # a masked prompt
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    whole, whole_loss = _train_two_rows(tmp_path, "whole", IVLTrainer, 2, 1, rows)
    accumulated, accumulated_loss = _train_two_rows(tmp_path, "accumulated", IVLTrainer, 1, 2, rows)
    averaged, _ = _train_two_rows(tmp_path, "averaged", Trainer, 1, 2, rows)
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-4)
    initial = {n: p.detach() for n, p in make_value().named_parameters()}  # built from a fixed seed
    for n in whole:
        step = (whole[n] - initial[n]).norm().item()
        assert (accumulated[n] - whole[n]).norm().item() <= 1e-4 * step + 1e-7, n
    worst = max((averaged[n] - whole[n]).norm().item() / max((whole[n] - initial[n]).norm().item(), 1e-12)
                for n in whole)
    assert worst > 0.05, "the two micro-batches' means average to the whole mean: the test has no power"


def test_peft_lora_value_network(tmp_path):
    peft = pytest.importorskip("peft")
    base, value = make_base(), make_value()
    lora = peft.get_peft_model(value, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model = IVLForCausalLM(base, lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids, mask, labels = _batch()
    losses = _train_plain(model, ids, mask, labels, steps=12, lr=1e-2)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    fresh_value = make_value()  # same seed: the same frozen weights under the adapter
    loaded = IVLForCausalLM.from_pretrained(base, str(tmp_path / "adapter"), value_base_model=fresh_value)
    loaded.eval()
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(before, after)


def test_save_pretrained_through_a_symlink_and_over_the_other_kind(tmp_path):
    """save_directory a link to an empty directory: before, os.rmdir on the link (NotADirectoryError); now the
    directory it points to gets the files and the link stays. overwrite=True with full weights over an earlier
    PEFT adapter: before, adapter_config.json stayed and from_pretrained took the old adapter; now it is gone
    (and the reverse)."""
    peft = pytest.importorskip("peft")
    base = make_base()
    real, link = tmp_path / "disk" / "value", tmp_path / "value"
    real.mkdir(parents=True)
    link.symlink_to(real)
    model = IVLForCausalLM(base, make_value())
    model.save_pretrained(str(link))
    assert link.is_symlink() and (real / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "value"]
    assert os.listdir(tmp_path / "disk") == ["value"]

    out = tmp_path / "out"
    lora = peft.get_peft_model(make_value(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    IVLForCausalLM(base, lora).save_pretrained(str(out))
    assert (out / "adapter_config.json").is_file()
    full = make_value(seed=3)
    IVLForCausalLM(base, full).save_pretrained(str(out), overwrite=True)
    assert not {"adapter_config.json", "adapter_model.safetensors"} & set(os.listdir(out))
    loaded = IVLForCausalLM.from_pretrained(base, str(out)).value_model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in full.state_dict().items())
    IVLForCausalLM(base, lora).save_pretrained(str(out), overwrite=True)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("l1_coef", [-1.0, float("nan"), float("inf"), 1e39])
def test_l1_coef_is_checked_at_construction(l1_coef):
    with pytest.raises(ValueError, match="l1_coef must be"):
        IVLForCausalLM(make_base(), make_value(), l1_coef=l1_coef)
