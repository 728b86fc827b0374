"""The real pretrained model (SmolLM2-135M-Instruct, fetched by ``gradlens fetch smollm2``).

One model is loaded for the whole module. Without the cached model (no network when
``.ci/run`` fetched it) every test here is skipped with the reason, never passed.

Exactness at step 0 on chat-templated, right-padded pairs: the recorder's split against
two separate ``autograd.grad`` passes over the same forward (the chosen rows' and the
rejected rows' share of the DPO loss). Measured here (torch 2.13, CPU, 3 pairs):

    float32:        norms 9.9e-6 relative, dot 1.17e-5 (relative to |g_c| |g_r|), the five parameters'
                    squared norms 1.4e-5 (the embedding tied to the head, q_proj, down_proj, two RMSNorms)
    bf16 autocast:  against the reference taken under the same autocast: norms 1.09e-4, dot 7.5e-5,
                    per-parameter 1.45e-3 (both sides run the bf16 forward; the rest is summation order)
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import gradlens
from gradlens.pretrained.fetch import model_dir, source_dir
from gradlens.pretrained.load import load_causal_lm
from gradlens.pretrained.sources import SMOLLM2
from gradlens.record.data import PreferenceRecord
from gradlens.record.logps import sequence_logps
from gradlens.record.tokenization import collate_pairs, tokenize_record
from gradlens.verifiable.sampling import SamplingSettings, cached_samples, messages, offpolicy_pairs, onpolicy_pairs
from gradlens.verifiable.tasks import make_tasks
from gradlens.verifiable.verify import is_correct

FP32_TOL = 2e-5        # measured 9.9e-6 (norms) and 1.17e-5 (dot)
PARAM_TOL = 1e-4       # measured 1.4e-5
BF16_TOL = 3e-4        # measured 1.09e-4 (norms; dot 7.5e-5)
BF16_PARAM_TOL = 5e-3  # measured 1.45e-3
PARAMS = (
    "model.embed_tokens.weight",                 # tied to lm_head: two uses
    "model.layers.3.self_attn.q_proj.weight",
    "model.layers.17.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.29.post_attention_layernorm.weight",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: on a machine shared with other jobs, more threads make each small
    operation wait for descheduled ones (several times slower); on an idle machine one thread costs little here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = model_dir(SMOLLM2)
    except ValueError as exc:
        pytest.skip(f"the real model is not available: {exc}")
    model, tokenizer = load_causal_lm(path)
    return model.eval(), tokenizer


def chat_batch(tokenizer, n: int = 3):
    """``n`` off-policy pairs through the chat template; rows differ in length, so there is padding."""
    pairs = []
    for i, p in enumerate(offpolicy_pairs(make_tasks(n, seed=3))):
        record = PreferenceRecord(messages(p.task), [{"role": "assistant", "content": p.chosen}],
                                  [{"role": "assistant", "content": p.rejected}], f"pair {i}")  # fmt: skip
        pairs.append(tokenize_record(tokenizer, record, conversational=True, source="test"))
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert (batch.attention_mask == 0).any(), "the batch must have padding"
    return batch


def dpo_loss(logps, n):
    g = torch.Generator().manual_seed(1)
    ref = logps.detach() + 0.5 * torch.randn(logps.shape, generator=g)
    return gradlens.preference_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=0.1, method="dpo").loss


def reference_split(model, batch, n):
    """Per-parameter (g_chosen, g_rejected) by two separate autograd.grad passes."""
    names, params = zip(*[(k, p) for k, p in model.named_parameters() if p.requires_grad])
    logps, _ = sequence_logps(model, batch)
    (w,) = torch.autograd.grad(dpo_loss(logps, n), logps, retain_graph=True)
    split = []
    for rows in (slice(0, n), slice(n, 2 * n)):
        grads = torch.autograd.grad(logps[rows], params, grad_outputs=w[rows].float(), retain_graph=rows.start == 0)
        split.append({k: g.detach().double() for k, g in zip(names, grads)})
    return split


def recorded(model, batch, n):
    rec = gradlens.GradientRecorder(model)
    try:
        model.zero_grad(set_to_none=True)
        logps, _ = sequence_logps(model, batch)
        with rec.capture(groups={"chosen": slice(0, n), "rejected": slice(n, 2 * n)}) as cap:
            dpo_loss(logps, n).backward()
    finally:
        rec.close()
        model.zero_grad(set_to_none=True)
    return cap


def compare(cap, gc, gr):
    """Largest relative errors: (global norms and dot, the chosen parameters' squared norms)."""
    vc, vr = (torch.cat([g.reshape(-1) for g in d.values()]) for d in (gc, gr))
    errors = [abs(cap.norm("chosen") - vc.norm().item()) / vc.norm().item(),
              abs(cap.norm("rejected") - vr.norm().item()) / vr.norm().item(),
              abs(cap.dot("chosen", "rejected") - (vc @ vr).item()) / (vc.norm() * vr.norm()).item()]  # fmt: skip
    table = cap.per_layer().set_index("name")
    per_param = []
    for name in PARAMS:
        for group, ref in (("chosen", gc), ("rejected", gr)):
            want = ref[name].pow(2).sum().item()
            per_param.append(abs(table.loc[name, f"sq_norm/{group}"] - want) / want)
    return max(errors), max(per_param)


def test_fp32_split_is_exact_at_step_0(smollm2):
    model, tokenizer = smollm2
    batch = chat_batch(tokenizer)
    gc, gr = reference_split(model, batch, 3)
    cap = recorded(model, batch, 3)
    assert not cap.unattributed
    assert set(cap.per_layer().set_index("name").loc["model.embed_tokens.weight", "module"].split(",")) == {"model.embed_tokens", "lm_head"}
    global_err, param_err = compare(cap, gc, gr)
    assert global_err <= FP32_TOL, global_err
    assert param_err <= PARAM_TOL, param_err


def test_bf16_autocast_split(smollm2):
    model, tokenizer = smollm2
    batch = chat_batch(tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gc, gr = reference_split(model, batch, 3)
        cap = recorded(model, batch, 3)
    global_err, param_err = compare(cap, gc, gr)
    assert global_err <= BF16_TOL, global_err
    assert param_err <= BF16_PARAM_TOL, param_err


def test_onpolicy_samples_are_cached_by_model_and_settings(smollm2, tmp_path):
    model, tokenizer = smollm2
    tasks = make_tasks(4, seed=0)
    settings = SamplingSettings(samples=2, max_new_tokens=6, seed=0)
    samples = cached_samples(model, tokenizer, tasks, settings, cache_dir=tmp_path, model_hash="m1", log=lambda line: None)
    assert len(samples) == 4 and all(len(s) == 2 for s in samples)

    class Refuses(nn.Module):  # a cache hit must not sample
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))

        def generate(self, *args, **kwargs):
            raise AssertionError("sampled although cached")

    again = cached_samples(Refuses(), tokenizer, tasks, settings, cache_dir=tmp_path, model_hash="m1", log=lambda line: None)
    assert again == samples and len(list(tmp_path.glob("samples-*.json"))) == 1
    for other_hash, other_settings in (("m2", settings), ("m1", replace(settings, temperature=0.7))):  # another cache entry each
        with pytest.raises(AssertionError, match="sampled although cached"):
            cached_samples(Refuses(), tokenizer, tasks, other_settings, cache_dir=tmp_path, model_hash=other_hash, log=lambda line: None)
    pairs = onpolicy_pairs(tasks, samples)
    assert len(pairs) == 4 and all(is_correct(p.task, p.chosen) and not is_correct(p.task, p.rejected) for p in pairs)
    for p, texts in zip(pairs, samples):  # a sampled side is one of the samples; a filled one is the task's own answer
        assert p.chosen in texts or (p.kind == "reference_chosen" and p.chosen == p.task.answer)
        assert p.rejected in texts or (p.kind == "template_rejected" and p.rejected == p.task.wrong)


def test_record_from_a_gguf_file_writes_checkpoints_from_pretrained_loads(smollm2, tmp_path):
    """`gradlens record --env user --model PATH.gguf`: the GGUF is dequantised, trained (every weight), and the
    checkpoint is a plain Hugging Face directory, the same model as the cached one up to the (negligible) step."""
    import json

    from transformers import AutoModelForCausalLM

    from gradlens.cli import main

    gguf = source_dir(SMOLLM2) / SMOLLM2.gguf_name
    if not gguf.is_file():
        pytest.skip(f"{gguf}: not fetched (`gradlens fetch smollm2`)")
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for p in offpolicy_pairs(make_tasks(4, seed=2)):
            f.write(json.dumps({"prompt": messages(p.task), "chosen": [{"role": "assistant", "content": p.chosen}],
                                "rejected": [{"role": "assistant", "content": p.rejected}]}) + "\n")  # fmt: skip
    run = tmp_path / "run"
    assert main(["record", "--env", "user", "--model", str(gguf), "--data", str(data), "--steps", "1", "--batch-size", "2",
                 "--optimizer", "sgd", "--lr", "1e-9", "--loss", "dpo", "--out", str(run), "--quiet", "--no-tensorboard", "--threads", "1"]) == 0  # fmt: skip
    again = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step_1", local_files_only=True)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        got, cached = (m(input_ids=ids).logits for m in (again, smollm2[0]))
    assert torch.allclose(got, cached, atol=1e-4, rtol=0)


def test_record_smollm2_three_steps(tmp_path):
    """`gradlens record --env smollm2`, 3 steps (off-policy pairs, 6 prompts: the sampling has its own test)."""
    from gradlens.cli import main
    from gradlens.runs import load_run

    try:
        model_dir(SMOLLM2)
    except ValueError as exc:
        pytest.skip(f"the real model is not available: {exc}")
    run_dir = tmp_path / "run"
    assert main(["record", "--env", "smollm2", "--steps", "3", "--eval-every", "3", "--prompts", "6", "--pairs", "offpolicy", "--batch-size", "2",
                 "--loss", "dpo", "--out", str(run_dir), "--quiet", "--threads", "1"]) == 0  # fmt: skip
    run = load_run(run_dir)
    assert run.summary["status"] == "complete" and len(run.steps) == 3 and run.summary["unattributed_parameters"] == []
    assert (run.steps["grad_norm/chosen"] > 0).all() and run.steps["grad/cosine"].between(-1, 1).all()
    assert list(run.evals.step) == [0, 3]
    start, end = run.evals.iloc[0], run.evals.iloc[1]
    assert start["eval/kl_to_ref"] == 0 and start["eval/logps_change/chosen"] == 0  # step 0: the policy is the reference
    assert 0 <= end["eval/verifier_accuracy"] <= 1 and end["eval/kl_to_ref_se"] >= 0
    assert end["eval/logps_change/chosen"] != 0
    assert set(run.layers.layer) and all("lora_" in layer for layer in set(run.layers.layer))  # LoRA by default
    assert run.config["lora_r"] == 8
    # 420 adapter matrices in layers.csv; the heatmap reads as one row per block and kind.
    from gradlens.plot import preference
    from gradlens.plot.registry import PlotOptions
    from gradlens.plot.style import plt

    assert run.layers.layer.nunique() == 30 * 7 * 2
    fig = preference.fig_layer_heatmap({"dpo": [run]}, PlotOptions(out=tmp_path))
    try:
        rows = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert rows == [f"block {i} · {kind}" for i in range(30) for kind in ("attention", "mlp")]
    finally:
        plt.close(fig)


def test_trl_trainer_with_peft_records_three_steps(smollm2, tmp_path):
    datasets, peft, trl = (pytest.importorskip(m) for m in ("datasets", "peft", "trl"))
    from gradlens.integrations.trl import GradlensDPOTrainer
    from gradlens.runs import load_run

    rows = [{"prompt": messages(p.task), "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in offpolicy_pairs(make_tasks(6, seed=5))]  # fmt: skip
    args = trl.DPOConfig(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-4,
                         report_to="none", use_cpu=True, bf16=False, max_length=96, logging_steps=1, save_strategy="no", seed=0)  # fmt: skip
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = GradlensDPOTrainer(model=str(model_dir(SMOLLM2)), args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=smollm2[1], gradlens_dir=tmp_path / "run", peft_config=lora)  # fmt: skip
    trainer.train()
    logged = [h for h in trainer.state.log_history if "grad_norm/chosen" in h]
    assert len(logged) == 3
    for h in logged:
        assert h["grad_norm/chosen"] > 0 and h["grad_norm/rejected"] > 0 and -1 <= h["grad/cosine"] <= 1
    run = load_run(tmp_path / "run")
    assert len(run.steps) == 3 and run.summary["unattributed_parameters"] == []
    assert all("lora_" in layer for layer in set(run.layers.layer))


def test_completion_logps_equal_the_full_head(smollm2):
    """smollm2's log-probs apply the head from the first completion token only: the same sums."""
    from gradlens.record.envs.smollm2 import completion_logps

    model, tokenizer = smollm2
    batch = chat_batch(tokenizer, 2)
    full, n_full = sequence_logps(model, batch)
    kept, n_kept = completion_logps(model, batch)
    assert torch.equal(n_full, n_kept)
    assert torch.allclose(full, kept, rtol=1e-6, atol=1e-5)
