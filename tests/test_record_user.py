"""`gradlens record --env user`: a local model + tokenizer built and saved by the test.

Covers the standard and conversational formats in JSONL, CSV and Parquet, the
step-0 exactness of the recorded chosen/rejected norms against an independent
computation, and TRL-style truncation.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from gradlens.cli import main

WORDS = "the a cat dog sat ran on mat fast slow good bad yes no why how what is it you me".split()
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

STANDARD = [
    {"prompt": "why is the cat", "chosen": "the cat sat on the mat", "rejected": "the dog ran"},
    {"prompt": "what is it", "chosen": "it is good", "rejected": "it is bad bad bad"},
    {"prompt": "how", "chosen": "fast", "rejected": "slow slow"},
    {"prompt": "you me", "chosen": "yes you", "rejected": "no"},
    {"prompt": "the dog", "chosen": "sat on a mat", "rejected": "ran fast on the mat"},
    {"prompt": "is it a cat", "chosen": "yes it is a cat", "rejected": "no it is a dog"},
]


def _conversation(row: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A GPT-2 config-built model and a WordLevel tokenizer with a chat template, saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", *CHAT_TOKENS]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tiny-model")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=2, eos_token_id=3, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _record(model_dir, data, out, *extra):
    return main(["record", "--env", "user", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                 "--loss", "dpo", "--quiet", *extra])


def _steps(out):
    return pd.read_csv(out / "steps.csv")


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl-conversational", "csv", "parquet", "parquet-conversational"])
def test_user_env_end_to_end(model_dir, tmp_path, fmt):
    rows = [_conversation(r) for r in STANDARD] if fmt.endswith("conversational") else STANDARD
    suffix = fmt.split("-")[0]
    data = tmp_path / f"prefs.{suffix}"
    if suffix == "jsonl":
        _write_jsonl(data, rows)
    elif suffix == "csv":
        pd.DataFrame(rows).to_csv(data, index=False)
    else:
        pd.DataFrame(rows).to_parquet(data)
    out = tmp_path / "run"
    rc = _record(model_dir, data, out, "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--eval-every", "2")
    assert rc == 0
    steps = _steps(out)
    assert steps["step"].tolist() == [0, 1, 2]
    assert steps["nonfinite"].eq(0).all()
    assert math.isclose(steps.loc[0, "loss"], math.log(2), rel_tol=1e-6)  # policy == reference at step 0
    header = json.loads((out / "config.json").read_text())
    assert header["config"]["env_info"]["conversational"] is fmt.endswith("conversational")
    assert header["config"]["env_info"]["num_pairs"] == len(STANDARD)
    evals = pd.read_csv(out / "evals.csv")
    assert evals["step"].tolist() == [0, 2, 3]
    # Without --eval-data the evaluation uses training pairs: never called held-out accuracy.
    assert {"eval/train_pair_accuracy", "eval/logps/chosen", "eval/logps/rejected"} <= set(evals.columns)
    assert "eval/pref_accuracy" not in evals.columns


def _reference_norms(model_dir, rows, beta):
    """Independent of gradlens: TRL tokenisation, one forward, two autograd.grad passes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    seqs, masks = [], []
    for side in ("chosen", "rejected"):
        for r in rows:
            p = tok(r["prompt"])["input_ids"]
            c = tok(r[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    comp = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    per_token = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).squeeze(2)
    logps = (per_token * comp[:, 1:]).sum(1)
    b = len(rows)
    ref = logps.detach()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(lc, lr):
        u = beta * ((lc - ref[:b]) - (lr - ref[b:]))
        return -torch.nn.functional.logsigmoid(u).mean()

    g_c = torch.autograd.grad(loss(logps[:b], logps[b:].detach()), params, retain_graph=True)
    g_r = torch.autograd.grad(loss(logps[:b].detach(), logps[b:]), params)
    norm = lambda gs: math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs))  # noqa: E731
    return norm(g_c), norm(g_r)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_step0_norms_match_independent_reference(model_dir, tmp_path, grad_accum):
    batch = 5
    data = _write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    out = tmp_path / "run"
    rc = _record(model_dir, data, out, "--no-shuffle", "--steps", "1", "--batch-size", str(batch),
                 "--grad-accum", str(grad_accum), "--beta", "0.1", "--dtype", "float32", "--device", "cpu")
    assert rc == 0
    row = _steps(out).iloc[0]
    want_c, want_r = _reference_norms(model_dir, STANDARD[:batch], beta=0.1)
    assert abs(row["grad_norm/chosen"] - want_c) <= 1e-5 * want_c
    assert abs(row["grad_norm/rejected"] - want_r) <= 1e-5 * want_r
    identity = row["grad_norm/chosen"] ** 2 + row["grad_norm/rejected"] ** 2 + 2 * row["grad/dot"]
    assert math.isclose(identity, row["grad_norm"] ** 2, rel_tol=1e-5)


def test_long_pairs_are_truncated_the_trl_way(model_dir, tmp_path):
    rows = STANDARD + [{"prompt": "the cat", "chosen": "yes " * 30 + "good", "rejected": "no " * 30 + "bad"}]
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"1 pair\(s\) were longer than --max-length 12 tokens and were truncated"):
        assert _record(model_dir, data, out, "--steps", "1", "--batch-size", "2", "--max-length", "12") == 0
    info = json.loads((out / "config.json").read_text())["config"]["env_info"]
    assert info["pairs_truncated"] == 1 and info["num_pairs"] == len(rows)


def test_prompt_longer_than_max_length_is_refused(model_dir, tmp_path, capsys):
    rows = STANDARD + [{"prompt": "the cat sat on the mat " * 3, "chosen": "yes", "rejected": "no"}]
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "run"
    assert _record(model_dir, data, out, "--max-length", "12") == 2
    err = capsys.readouterr().err
    assert f"{data}: line 7: the prompt alone has 19 tokens, at least --max-length 12" in err
    assert not out.exists()


def test_identical_pairs_are_skipped_with_a_count(model_dir, tmp_path):
    rows = STANDARD[:3] + [{"prompt": "why", "chosen": "yes", "rejected": "yes"}] + STANDARD[3:] + [{"prompt": "a", "chosen": "no", "rejected": "no"}]
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"skipped 2 pair\(s\) whose chosen equals rejected \(line 4, line 8\)"):
        assert _record(model_dir, data, out, "--steps", "1", "--batch-size", "2") == 0
    info = json.loads((out / "config.json").read_text())["config"]["env_info"]
    assert info["data_rows_skipped_identical"] == 2 and info["num_pairs"] == len(STANDARD)


def test_eval_data_file_is_used_for_evaluations(model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    heldout = _write_jsonl(tmp_path / "heldout.jsonl", STANDARD[:2])
    out = tmp_path / "run"
    assert _record(model_dir, data, out, "--eval-data", str(heldout), "--steps", "1", "--batch-size", "2") == 0
    info = json.loads((out / "config.json").read_text())["config"]["env_info"]
    assert info["eval_source"] == str(heldout)
    assert set(pd.read_csv(out / "evals.csv")["eval/pref_accuracy"]) <= {0.0, 0.5, 1.0}  # two held-out pairs


# ---------------------------------------------------------------- TRL's formats, names and checkpoints

FAST = ("--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--eval-every", "0", "--no-shuffle", "--device", "cpu")
COMPARED = ["loss", "grad_norm", "grad_norm/chosen", "grad_norm/rejected", "grad/dot", "rewards/margins"]


def _implicit(row: dict) -> dict:
    """TRL's implicit-prompt format: the prompt is the shared start of chosen and rejected."""
    return {"chosen": row["prompt"] + " " + row["chosen"], "rejected": row["prompt"] + " " + row["rejected"]}


@pytest.fixture(scope="module")
def reference_run(model_dir, tmp_path_factory):
    """The standard-format JSONL run every other spelling of the same data must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    assert _record(model_dir, _write_jsonl(root / "prefs.jsonl", STANDARD), root / "run", *FAST) == 0
    return _steps(root / "run")


def _same_run(out, reference):
    steps = _steps(out)
    assert steps["step"].tolist() == reference["step"].tolist()
    for column in COMPARED:  # same pairs, same tokens, same model: bit-identical rows
        assert steps[column].tolist() == reference[column].tolist(), column


def test_extract_prompt_matches_trl():
    from trl.data_utils import extract_prompt as trl_extract

    from gradlens.record.data import extract_prompt

    examples = [_implicit(r) for r in STANDARD] + [
        {"chosen": "abc", "rejected": "abcd"},  # one is a prefix of the other (TRL's loop runs out)
        {"chosen": "say: yes", "rejected": "say: no"},
        {
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}],
        },
    ]
    for example in examples:
        want = trl_extract(example)
        assert dict(zip(("prompt", "chosen", "rejected"), extract_prompt(example["chosen"], example["rejected"]))) == want


def test_implicit_prompt_jsonl_trains_like_trl_extracted_prompts(model_dir, tmp_path):
    """The reference is TRL's own extract_prompt, written out as an explicit-prompt file.

    (Pairs 1 and 2 show why: their completions start with the same word, which TRL puts in the prompt.)
    """
    from trl.data_utils import extract_prompt as trl_extract

    implicit = [_implicit(r) for r in STANDARD]
    assert _record(model_dir, _write_jsonl(tmp_path / "explicit.jsonl", [trl_extract(r) for r in implicit]), tmp_path / "ref", *FAST) == 0
    assert _record(model_dir, _write_jsonl(tmp_path / "implicit.jsonl", implicit), tmp_path / "run", *FAST) == 0
    _same_run(tmp_path / "run", _steps(tmp_path / "ref"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["env_info"]["implicit_prompts"] == len(STANDARD)


def test_implicit_prompt_without_a_shared_start_names_the_line(model_dir, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "bad.jsonl", [_implicit(r) for r in STANDARD] + [{"chosen": "yes", "rejected": "no"}])
    assert _record(model_dir, data, tmp_path / "run", *FAST) == 2
    err = capsys.readouterr().err
    assert f"{data}: line 7: no 'prompt' field, and 'chosen' and 'rejected' do not start with a shared prompt" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_saved_dataset_directory_with_other_column_names(model_dir, tmp_path, reference_run):
    datasets = pytest.importorskip("datasets")
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in STANDARD]
    datasets.Dataset.from_list(renamed).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(renamed)}).save_to_disk(str(tmp_path / "dsdict"))
    flags = ("--prompt-column", "question", "--chosen-column", "good", "--rejected-column", "bad")
    for name in ("ds", "dsdict"):
        assert _record(model_dir, tmp_path / name, tmp_path / f"run-{name}", *FAST, *flags) == 0
        _same_run(tmp_path / f"run-{name}", reference_run)


def test_column_flags_name_the_missing_column(model_dir, tmp_path, capsys):
    data = tmp_path / "prefs.csv"
    pd.DataFrame(STANDARD).to_csv(data, index=False)
    assert _record(model_dir, data, tmp_path / "run", *FAST, "--chosen-column", "good") == 2
    assert f"{data}: line 1 (header): missing column(s) ['good']" in capsys.readouterr().err


def test_trl_recipe_yaml_loads_as_it_is(model_dir, tmp_path):
    """A TRL DPO recipe's YAML (TRL's names) is trained by TRL's own DPOTrainer, recorded by gradlens."""
    import warnings

    data = _write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(
        f"# TRL recipe\nmodel_name_or_path: {model_dir}\ndataset_name: {data}\nlearning_rate: 1.0e-3\n"
        "per_device_train_batch_size: 2\ngradient_accumulation_steps: 2\nmax_steps: 2\nbeta: 0.1\n"
        "num_train_epochs: 1\nbf16: false\ngradient_checkpointing: true\nlogging_steps: 1\nreport_to: none\n"
        f"output_dir: {tmp_path / 'trl-out'}\nloss: dpo\n",
        encoding="utf-8",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every key is honoured: nothing is warned about
        rc = main(["record", "--config", str(recipe), "--quiet", "--device", "cpu"])
    assert rc == 0
    config = json.loads((tmp_path / "trl-out" / "gradlens" / "config.json").read_text())["config"]
    assert (config["env"], config["learning_rate"], config["gradient_accumulation_steps"]) == ("trl", 1e-3, 2)
    assert config["recipe_keys"]["gradient_checkpointing"] is True
    assert list(_steps(tmp_path / "trl-out" / "gradlens").step) == [0, 1]
    assert (tmp_path / "trl-out" / "model.safetensors").is_file()  # TRL's output_dir keeps its meaning


def test_bad_yaml_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nlr: [1e-3\n", encoding="utf-8")
    assert main(["record", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 3: not valid YAML" in err and "Traceback" not in err


def test_checkpoints_load_with_from_pretrained(model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    out = tmp_path / "run"
    assert _record(model_dir, data, out, *FAST) == 0
    checkpoint = out / "checkpoints" / "step_2"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    saved = load_file(str(checkpoint / "model.safetensors"))  # what --resume reloads
    state = model.state_dict()
    assert saved and all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    start = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).state_dict()
    assert not all(torch.equal(start[name], tensor) for name, tensor in saved.items())  # it did train
    assert tokenizer("the cat sat")["input_ids"] == AutoTokenizer.from_pretrained(model_dir)("the cat sat")["input_ids"]
    assert model.lm_head.weight is model.transformer.wte.weight  # tied again on load


def test_default_lr_is_explained_when_the_loss_hardly_moves(model_dir, tmp_path, capsys):
    from gradlens.record.command import add_arguments

    data = _write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    assert _record(model_dir, data, tmp_path / "run", "--steps", "2", "--batch-size", "4", "--eval-every", "0") == 0
    out = " ".join(capsys.readouterr().out.split())  # the report wraps long lines
    assert "the loss hardly moved in 2 steps" in out and "--lr 1e-06 (TRL's default" in out
    assert "try --lr 1e-05 or 0.0001" in out  # larger than the rate that stalled
    run = tmp_path / "run-1e-4"
    assert _record(model_dir, data, run, "--steps", "2", "--batch-size", "4", "--eval-every", "0", "--lr", "1e-12") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--lr 1e-12 may be too small for this model: try --lr 1e-11 or 1e-10" in out
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "1e-6 = TRL's DPOConfig default" in " ".join(parser.format_help().split())


def test_quiet_shows_no_loading_bar_and_bf16_gets_a_note(model_dir, tmp_path, capfd):
    data = _write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    assert _record(model_dir, data, tmp_path / "quiet", "--steps", "1", "--batch-size", "4", "--eval-every", "0") == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err  # transformers' bars are off under --quiet
    out = ["record", "--env", "user", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "bf16"),
           "--loss", "dpo", "--steps", "1", "--batch-size", "4", "--eval-every", "0", "--dtype", "bfloat16"]  # fmt: skip
    assert main(out) == 0
    err = " ".join(capfd.readouterr().err.split())
    assert "note: bfloat16 weights: every activation is rounded to about 3 significant digits" in err
    assert "the chosen and rejected parts still add up to the gradient this run computed" in err


def test_a_warning_is_one_clean_line(model_dir, tmp_path):
    """As a user sees it (a real process: pytest would record the warning instead of printing it)."""
    import os
    import subprocess
    import sys

    rows = STANDARD[:3] + [{"prompt": "the cat", "chosen": " sat", "rejected": " sat"}] + STANDARD[3:]
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    command = [sys.executable, "-m", "gradlens", "record", "--env", "user", "--model", str(model_dir), "--data", str(data),
               "--out", str(tmp_path / "run"), "--loss", "dpo", "--quiet", "--steps", "1", "--batch-size", "4", "--eval-every", "0"]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "PYTHONWARNINGS": "default"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == [f"gradlens: warning: {data}: skipped 1 pair(s) whose chosen equals rejected (line 4)"]
