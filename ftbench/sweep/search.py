"""Searches in a sweep: an Optuna study per grid point, each trial an ordinary run.

A sweep file's ``search:`` block (see :mod:`ftbench.sweep.grid` for the whole file) turns every grid
point (e.g. each tuner x objective) into an Optuna study over a space of dotted keys::

    search:
      trials: 8                   # trials per grid point (completed + pruned + failed)
      metric: val/loss            # a validation metric; min:/max: NAME says the direction (as --select)
      sampler: tpe                # tpe (default) | random | grid (choice lists only)
      seed: 0                     # the sampler's seed (trial k draws with seed + k); TPE draws the
                                  # first half of the trials (at most 10) at random
      pruner: none                # none (default) | median | hyperband, on the validation curve
      heartbeat_s: 60             # a trial with no heartbeat for 2 x this is a killed one: rerun
      space:                      # one space for every point ...
        lr: {log_uniform: [1.0e-5, 1.0e-2]}
    # ... or a list: the first entry whose ``when`` matches the point gives its space
      space:
        - when: {tuner: ../tuner/full.yaml}
          space: {lr: {log_uniform: [1.0e-6, 1.0e-4]}}
        - when: {tuner: [../tuner/lora.yaml, ../tuner/dora.yaml]}   # a list: any of these
          space:
            lr: {log_uniform: [1.0e-5, 1.0e-2]}
            tuner.init_args.peft_config.init_args.r: {choice: [4, 8, 16, 64]}

A range is ``{uniform: [LOW, HIGH]}``, ``{log_uniform: [LOW, HIGH]}`` (LOW > 0), ``{int: [LOW,
HIGH]}``, ``{log_int: [LOW, HIGH]}`` or ``{choice: [A, B, ...]}``; keys take the sweep's short names
(``lr``, ``seed``, ``objective``); ``when`` compares the point's value of each key (YAML paths from
the sweep file's folder, as in the grid). Every grid point is searched; ``runs:`` entries run once,
as in any sweep.

**Storage.** ``{out}/search.db`` (SQLite) unless ``ftbench sweep --storage URL`` names another database
Optuna accepts (``postgresql://...``, ``mysql://...``): machines running the same sweep command on one
database share each study. A process counts the point's trials (completed, pruned, failed, running on
another machine) and asks for the next only while fewer than ``trials``; a trial whose process died
(no heartbeat for ``2 x heartbeat_s``) is failed by the next process to look
(:func:`optuna.storages.fail_stale_trials`) and queued again with the same values, as is a trial
stopped by Ctrl-C; a finished trial is never rerun. A changed space, metric, sampler, seed or
pruner is a new study (its name ends in their digest); more ``trials`` continue the same one.

**A trial is an ordinary run.** Its values are set on the point's command line (a
:class:`~ftbench.sweep.grid.RunSpec` with the point's settings and the trial's), so its run id is the
one ``ftbench fit`` with those values gets, and the sweep's runner starts it as it starts every point
(:func:`ftbench.sweep.runs.run_one`). Its record carries ``run_info.search`` (study, trial number,
metric, direction, the values and their distributions): the report reads searches from records
alone (:mod:`ftbench.sweep.report.search`). The trial's value is the metric at the end of training
(the record's ``final``), as ``--select`` reads it. With a pruner, the run reports each validation
to the study (:class:`ftbench.bench.pruning.PruneOnValidation`) and stops early when the pruner says
so; its record says ``pruned`` and keeps its curve.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ftbench.errors import ConfigError, FTBenchError
from ftbench.sweep.grid import ALIASES, RunSpec, SweepError, point_text, resolve_value

KINDS = ("uniform", "log_uniform", "int", "log_int", "choice")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "hyperband")
_FIELDS = ("trials", "metric", "sampler", "seed", "pruner", "heartbeat_s", "space")
#: the child's side: the trial to report the validation curve to (set by the sweep, read by the run's CLI)
TRIAL_ENV = "FTBENCH_SEARCH_TRIAL"
EXTRA = "pip install 'ftbench[search]' (optuna, optuna-integration)"


def _optuna(path: Any):
    try:
        import optuna
    except ImportError as err:
        raise SweepError(f"{path}: search: needs the search extra: {EXTRA}") from err
    return optuna


@dataclass
class Search:
    """A sweep's ``search:`` block, checked."""

    path: str
    trials: int
    metric: str
    direction: str  # minimize | maximize
    sampler: str
    seed: int
    pruner: str
    heartbeat_s: int
    points: list["SearchPoint"] = field(default_factory=list)

    def study_name(self, sweep_name: str, point: "SearchPoint") -> str:
        """``{sweep}:{point's run id}:{digest}``: the digest of what makes trials comparable (space,
        metric, sampler, seed, pruner); ``trials`` is not part of it (more trials continue a study)."""
        what = {"space": point.space_json(), "metric": self.metric, "direction": self.direction,
                "sampler": self.sampler, "seed": self.seed, "pruner": self.pruner}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
        return f"{sweep_name}:{point.point.run_id}:{digest}"

    def budget(self, point: "SearchPoint") -> int:
        """Trials to run for ``point``: ``trials``, or the grid's size when the grid sampler has fewer."""
        if self.sampler == "grid":
            size = 1
            for d in point.distributions.values():
                size *= len(d.choices)
            return min(self.trials, size)
        return self.trials


@dataclass
class SearchPoint:
    """A grid point and its space: param name (as the sweep file writes it) -> dotted key / distribution."""

    point: RunSpec
    keys: dict[str, str]
    distributions: dict[str, Any]

    def space_json(self) -> dict[str, str]:
        from optuna.distributions import distribution_to_json

        return {name: distribution_to_json(d) for name, d in sorted(self.distributions.items())}

    def trial_spec(self, params: dict[str, Any], run_info: dict[str, Any], env: dict[str, str]) -> RunSpec:
        """The point's run with the trial's values set (an ordinary :class:`RunSpec`)."""
        p = self.point
        values = {self.keys[name]: v for name, v in params.items()}
        return RunSpec(p.subcommand, list(p.configs), {**p.overrides, **values}, {**p.label, **params}, p.root,
                       upstream=dict(p.upstream), run_info=run_info, env=env)


def suggest(trial: Any, name: str, dist: Any) -> Any:
    """``trial``'s value of ``name`` from ``dist`` (Optuna's suggest_* by the distribution's kind)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


# ---------------------------------------------------------------------------------- reading the block
def _distribution(optuna, path: Path, where: str, value: Any):
    """One range of the space: ``{log_uniform: [1e-5, 1e-2]}`` -> a FloatDistribution(log=True)."""
    from ftbench.sweep.grid import _coerce

    example = "e.g. {log_uniform: [1.0e-5, 1.0e-2]} or {choice: [4, 8, 16]}"
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in KINDS:
        raise SweepError(f"{path}: {where}: {value!r} is not a range: give one of {', '.join(KINDS)} with its "
                         f"values ({example})")
    kind, values = next(iter(value.items()))
    values = _coerce(values)
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: {where}: choice {values!r} is empty (give a list of values)")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise SweepError(f"{path}: {where}: choice {values!r} lists a value twice")
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            raise SweepError(f"{path}: {where}: choice {values!r}: values are numbers, strings or booleans")
        return optuna.distributions.CategoricalDistribution(values)
    number = int if kind in ("int", "log_int") else (int, float)
    if (not isinstance(values, list) or len(values) != 2
            or not all(isinstance(v, number) and not isinstance(v, bool) for v in values)):
        what = "integers" if number is int else "numbers"
        raise SweepError(f"{path}: {where}: {kind} takes [LOW, HIGH] ({what}), not {values!r}")
    low, high = values
    if low >= high:
        raise SweepError(f"{path}: {where}: {kind} [{low}, {high}] is empty (LOW must be below HIGH)")
    log = kind.startswith("log_")
    if log and low <= 0:
        raise SweepError(f"{path}: {where}: {kind} [{low}, {high}] reaches 0 or below (a log range needs LOW > 0)")
    if number is int:
        return optuna.distributions.IntDistribution(low, high, log=log)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log)


def _space(optuna, path: Path, where: str, space: Any) -> tuple[dict[str, str], dict[str, Any]]:
    from ftbench.sweep.grid import _canon_key

    if not isinstance(space, dict) or not space:
        raise SweepError(f"{path}: {where}: a space is a mapping of dotted keys to ranges "
                         "(e.g. lr: {log_uniform: [1.0e-5, 1.0e-2]})")
    keys, dists = {}, {}
    for name, value in space.items():
        key = _canon_key(name, path, where)
        if key in keys.values():
            raise SweepError(f"{path}: {where}: {name!r} and another name both set {key}")
        keys[str(name)] = key
        dists[str(name)] = _distribution(optuna, path, f"{where}.{name}", value)
    return keys, dists


def _matches(when: dict[str, Any], point: RunSpec) -> bool:
    return all(point.overrides.get(k) in v for k, v in when.items())


def _probe(path: Path, where: str, sp: SearchPoint, index: int) -> None:
    """Every key of the space is an option of the run: the point parsed with each range's first value."""
    first = {name: (d.choices[0] if hasattr(d, "choices") else d.low) for name, d in sp.distributions.items()}
    for name, value in first.items():
        probe = sp.trial_spec({name: value}, {}, {})
        try:
            probe.identity
        except ConfigError as err:
            # jsonargparse's refusal of a nested key lists every subtype it tried; its last clause says it
            said = re.search(r"unrecognized arguments: \S+", str(err))
            detail = said.group(0) if said else str(err).splitlines()[0][:300]
            raise SweepError(f"{path}: {where}.{name}: not an option of the run at point {index + 1} "
                             f"({point_text(sp.point)}): {detail}") from None


def parse_search(path: Path, block: Any, points: list[RunSpec], index: dict[int, int]) -> Search:
    """Check a sweep's ``search:`` block against its grid points (``index``: a point's place in the
    sweep); every error is one line naming the sweep file and the key."""
    if not isinstance(block, dict):
        raise SweepError(f"{path}: search: a mapping with trials, metric, space (and sampler, seed, pruner)")
    unknown = sorted(set(map(str, block)) - set(_FIELDS))
    if unknown:
        raise SweepError(f"{path}: search: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(_FIELDS)})")
    optuna = _optuna(path)
    trials = block.get("trials")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise SweepError(f"{path}: search.trials: {trials!r} is not a number of trials per point (an integer >= 1)")
    metric = block.get("metric", "val/loss")
    if not isinstance(metric, str):
        raise SweepError(f"{path}: search.metric: {metric!r} is not a metric name (e.g. val/loss, max:val/accuracy)")
    from ftbench.sweep.report.records import ReportError
    from ftbench.sweep.report.stats import parse_select

    try:
        name, mode = parse_select(metric)
    except ReportError as err:
        raise SweepError(f"{path}: search.metric: {str(err).split(': ', 1)[1]}") from None
    sampler = block.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise SweepError(f"{path}: search.sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    pruner = str(block.get("pruner", "none")) if block.get("pruner") is not None else "none"
    if pruner not in PRUNERS:
        raise SweepError(f"{path}: search.pruner: {block.get('pruner')!r} is not one of {', '.join(PRUNERS)}")
    seed = block.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SweepError(f"{path}: search.seed: {seed!r} is not an integer")
    heartbeat = block.get("heartbeat_s", 60)
    if not isinstance(heartbeat, int) or isinstance(heartbeat, bool) or heartbeat < 1:
        raise SweepError(f"{path}: search.heartbeat_s: {heartbeat!r} is not a whole number of seconds >= 1")
    search = Search(str(path), trials, name, "minimize" if mode == "min" else "maximize", sampler, seed, pruner,
                    heartbeat)
    space = block.get("space")
    if isinstance(space, list):
        entries = []
        for i, entry in enumerate(space):
            where = f"search.space[{i}]"
            if not isinstance(entry, dict) or set(entry) != {"when", "space"} or not isinstance(entry["when"], dict):
                raise SweepError(f"{path}: {where}: an entry is {{when: {{KEY: VALUE, ...}}, space: {{...}}}}")
            when = {}
            for k, v in entry["when"].items():
                key = ALIASES.get(str(k), str(k))
                when[key] = [resolve_value(path, x) for x in (v if isinstance(v, list) else [v])]
            entries.append((where, when, *_space(optuna, path, f"{where}.space", entry["space"])))
    elif space is None:
        raise SweepError(f"{path}: search.space: missing (e.g. space: {{lr: {{log_uniform: [1.0e-5, 1.0e-2]}}}})")
    else:
        entries = [("search.space", {}, *_space(optuna, path, "search.space", space))]
    for p in points:
        found = next((e for e in entries if _matches(e[1], p)), None)
        if found is None:
            raise SweepError(f"{path}: search.space: point {index[id(p)] + 1} ({point_text(p)}) matches no entry's "
                             "`when` (every grid point is searched)")
        where, _, keys, dists = found
        sp = SearchPoint(p, keys, dists)
        _probe(path, where if where == "search.space" else f"{where}.space", sp, index[id(p)])
        search.points.append(sp)
    if sampler == "grid":
        for where, _, _, dists in entries:
            ranged = [n for n, d in dists.items() if not hasattr(d, "choices")]
            if ranged:
                raise SweepError(f"{path}: {where}.{ranged[0]}: the grid sampler takes choice lists only")
    return search


# ---------------------------------------------------------------------------------- studies
def default_storage(out: str | Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'search.db'}"


def _retry_callback(optuna):
    """Optuna's callback that queues a failed trial again with the same values (renamed in 4.9:
    RetryFailedTrialCallback -> RetryHeartbeatStaleTrialCallback); (callback, the storage's keyword)."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        if cls is not None:
            return cls(), "heartbeat_stale_trial_callback"
        return optuna.storages.RetryFailedTrialCallback(), "failed_trial_callback"


def make_storage(url: str, heartbeat_s: int):
    """An RDB storage with heartbeats (a trial silent for 2 x ``heartbeat_s`` is stale: failed and
    queued again with the same values by :func:`optuna.storages.fail_stale_trials`)."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    callback, keyword = _retry_callback(optuna)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                                          **{keyword: callback})


def make_sampler(search: Search, point: SearchPoint, number: int = 0):
    """The sampler that draws trial ``number``'s values: seeded with ``seed + number``, so that a
    sequential search is reproducible and machines sharing a study never draw the same startup values."""
    import optuna

    if search.sampler == "grid":
        grid = {name: list(d.choices) for name, d in point.distributions.items()}
        return optuna.samplers.GridSampler(grid, seed=search.seed + number)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=search.seed + number)
    # Optuna's default of 10 random start-up trials would make a search of 8 trials a random search:
    # half the budget (at least one trial) draws at random, the rest from TPE's model of the results
    startup = max(1, min(10, search.trials // 2))
    return optuna.samplers.TPESampler(seed=search.seed + number, n_startup_trials=startup)


def open_study(search: Search, point: SearchPoint, study_name: str, storage: Any):
    import optuna

    from ftbench.bench.pruning import make_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=study_name, storage=storage, direction=search.direction,
                               sampler=make_sampler(search, point), pruner=make_pruner(search.pruner),
                               load_if_exists=True)


def counts(trials: list[Any]) -> dict[str, int]:
    """A study's trials by state, a failed trial that was queued again (same values) not counted."""
    from optuna.trial import TrialState

    retried = {t.system_attrs.get("failed_trial") for t in trials}
    out = {"completed": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
    names = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
             TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    for t in trials:
        if t.state == TrialState.FAIL and t.number in retried:
            continue
        out[names[t.state]] += 1
    return out


def _taken(c: dict[str, int]) -> int:
    return c["completed"] + c["pruned"] + c["failed"] + c["running"]


class Heartbeat:
    """Records the trial's heartbeat every ``interval`` s while its run goes on (what Optuna's own
    ``optimize`` loop does; ask-and-tell leaves it to the caller)."""

    def __init__(self, storage: Any, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a database hiccup: the next beat tries again; staleness needs two misses
                pass
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def trial_value(record: Optional[dict[str, Any]], metric: str) -> Optional[float]:
    """The trial's value: the metric at the end of training (``train_info.final``)."""
    final = ((record or {}).get("train_info") or {}).get("final") or {}
    value = final.get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


Runner = Callable[[RunSpec], str]


def study_lines(search: Search, sweep_name: str, storage_url: str, points: list[SearchPoint]) -> list[str]:
    """``--dry-run``'s line per study: its name and trials so far (nothing created)."""
    lines = []
    for sp in points:
        name = search.study_name(sweep_name, sp)
        c = {"completed": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
        try:
            import optuna

            if storage_url.startswith("sqlite:///") and not Path(storage_url[len("sqlite:///"):]).exists():
                raise FileNotFoundError  # a dry run creates no database
            study = optuna.load_study(study_name=name, storage=storage_url)
            c = counts(study.get_trials(deepcopy=False))
        except Exception:  # no database yet, or no such study: nothing run
            pass
        todo = max(0, search.budget(sp) - _taken(c)) + c["waiting"]
        lines.append(f"  search {sp.point.method:14s} {point_text(sp.point) or '(base)'}: {c['completed']} completed, "
                     f"{c['pruned']} pruned, {c['failed']} failed, {c['running']} running; {todo} to do "
                     f"(of {search.budget(sp)})  [{name}]")
    return lines


def run_search(search: Search, sweep_name: str, out: str | Path, storage_url: str, runner: Runner,
               points: Optional[list[SearchPoint]] = None, retry_failed: bool = False,
               say: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Run every point's study until it has ``trials`` trials; each trial is a :class:`RunSpec` handed
    to ``runner`` (the sweep's: one process per run), which returns the record's status. Returns
    (run id, status) per trial run here."""
    import optuna
    from optuna.trial import TrialState

    from ftbench.sweep.runs import DONE, read_record

    storage = make_storage(storage_url, search.heartbeat_s)
    callback, _ = _retry_callback(optuna)
    done: list[tuple[str, str]] = []
    for sp in points if points is not None else search.points:
        name = search.study_name(sweep_name, sp)
        study = open_study(search, sp, name, storage)
        if retry_failed:  # failed trials (not queued again yet) queued with the same values
            trials = study.get_trials(deepcopy=False)
            retried = {t.system_attrs.get("failed_trial") for t in trials}
            for t in trials:
                if t.state == TrialState.FAIL and t.number not in retried:
                    callback(study, t)
        while True:
            with warnings.catch_warnings():
                # fail_stale_trials is marked experimental; ask() warns that heartbeats are meant for
                # optimize() (which beats for its trial): Heartbeat below does that for ask-and-tell
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                optuna.storages.fail_stale_trials(study)  # killed trials: failed and queued again, same values
                c = counts(study.get_trials(deepcopy=False))
                if not c["waiting"] and _taken(c) >= search.budget(sp):
                    break
                asked = study.ask()
            storage.record_heartbeat(asked._trial_id)  # from now on a process that dies leaves a stale trial
            try:
                status, spec = _run_trial(search, sp, name, storage, storage_url, asked, runner, out, retry_failed,
                                          say, done)
            except BaseException as err:
                # Ctrl-C, the sweep stopped (a full disk): the trial is queued again with the same values;
                # a setting the run refuses is the trial's own failure
                study.tell(asked, state=TrialState.FAIL)
                if not isinstance(err, FTBenchError):
                    callback(study, study.get_trials(deepcopy=False)[asked.number])
                raise
            path = Path(out) / f"{spec.run_id}.json"
            value = trial_value(read_record(path), search.metric) if status == DONE else None
            if status == DONE and value is not None:
                study.tell(asked, value)
            elif status == "pruned":
                study.tell(asked, state=TrialState.PRUNED)
            else:
                if status == DONE:
                    say(f"  trial {asked.number}: the record has no {search.metric}: the trial counts as failed")
                study.tell(asked, state=TrialState.FAIL)
                if status == "interrupted":
                    callback(study, study.get_trials(deepcopy=False)[asked.number])
    return done


def _run_trial(search: Search, sp: SearchPoint, name: str, storage: Any, storage_url: str, asked: Any,
               runner: Runner, out: str | Path, retry_failed: bool, say: Callable[[str], None],
               done: list[tuple[str, str]]) -> tuple[Optional[str], RunSpec]:
    """Draw the asked trial's values, build its RunSpec and hand it to ``runner`` (unless the same run
    already has a record: the same settings are the same run); (its record's status, the spec)."""
    import optuna

    from ftbench.sweep.runs import DONE, FAILED, record_status

    # the values drawn with seed + trial number (see make_sampler); a queued trial keeps its own
    draw = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(search, sp, asked.number))
    trial = optuna.trial.Trial(draw, asked._trial_id)
    params = {pname: suggest(trial, pname, dist) for pname, dist in sp.distributions.items()}
    info = {"search": {"study": name, "trial": asked.number, "metric": search.metric,
                       "direction": search.direction, "params": params, "space": sp.space_json()}}
    env = {}
    if search.pruner != "none":
        env[TRIAL_ENV] = json.dumps({"storage": storage_url, "study": name, "trial_id": asked._trial_id,
                                     "metric": search.metric, "pruner": search.pruner})
    spec = sp.trial_spec(params, info, env)
    status = record_status(Path(out) / f"{spec.run_id}.json")
    if status in (DONE, "pruned") or (status in FAILED and not retry_failed):
        say(f"  trial {asked.number} of {name}: the same run as {spec.run_id} ({status}): not run again")
        return status, spec
    values = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    say(f"  trial {asked.number} of {name}: {values}")
    with Heartbeat(storage, asked._trial_id, search.heartbeat_s):
        status = runner(spec)
    done.append((spec.run_id, status))
    return status, spec
