"""The LightningCLI of a run (``ftbench fit|validate|test``), its parser for reading a command line
without running it (:func:`read_run`), and the checks made before a run starts.

``ftbench fit`` reads its own parsed config in ``before_instantiate_classes`` and the sweep reads a
point's command line with :func:`read_run` (the same parser, built once per process by
:func:`run_parser`, nothing instantiated): both through :func:`ftbench.config_reading.identity`, so a
standalone run and the same sweep point get the same id.

Both the command line (:mod:`ftbench.cli`, which dispatches) and the sweep (:mod:`ftbench.sweep`)
build on this module; it imports neither of them.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Optional

from ftbench.config_reading import RunIdentity, identity

# exact option names: argparse would take `--trainer.max_step 3` as `--trainer.max_steps 3`
PARSER_KWARGS = {"allow_abbrev": False, **{sub: {"allow_abbrev": False} for sub in ("fit", "validate", "test", "predict")}}
#: how a run's LightningCLI is made, besides its classes (``ftbench fit`` and :func:`run_parser` alike)
CLI_KWARGS = {"subclass_mode_model": True, "subclass_mode_data": True, "seed_everything_default": 42,
              "auto_configure_optimizers": False, "parser_kwargs": PARSER_KWARGS}


def installed(package: str) -> bool:
    """Whether ``package`` can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(package) is not None


def check_strategy(trainer) -> None:
    """Refuse, in one line, a multi-device strategy that cannot start as configured (before Lightning
    builds it): DeepSpeed not installed (the ``deepspeed`` extra); DeepSpeed or FSDP1 on a CPU
    accelerator, which Lightning 2.6 refuses (``The DeepSpeed strategy is only supported on CUDA
    GPUs``; ``The strategy `fsdp` requires a GPU accelerator``; FSDP2 runs there:
    configs/trainer/fsdp2.yaml); FSDP2's ``data_parallel_size`` x ``tensor_parallel_size`` not the
    number of processes."""
    from ftbench.errors import ConfigError

    strategy = trainer.get("strategy")
    name = str(getattr(strategy, "class_path", None) or strategy).rpartition(".")[2]
    on_cpu = str(trainer.get("accelerator")).lower() == "cpu"
    if "deepspeed" in name.lower():
        if not installed("deepspeed"):
            raise ConfigError(f"trainer.strategy: {name} needs the deepspeed package: pip install 'ftbench[deepspeed]'")
        if on_cpu:
            raise ConfigError(f"trainer.strategy: {name} does not run with trainer.accelerator cpu (Lightning runs "
                              "DeepSpeed on CUDA GPUs only)", hint="trainer.accelerator gpu, or FSDP2 on a CPU: "
                              "configs/trainer/fsdp2.yaml")
    if name in ("FSDPStrategy", "fsdp", "fsdp_cpu_offload") and on_cpu:
        raise ConfigError(f"trainer.strategy: {name} (FSDP1) does not run with trainer.accelerator cpu (Lightning "
                          "requires a GPU accelerator for it)", hint="FSDP2 runs on a CPU: configs/trainer/fsdp2.yaml")
    args = getattr(strategy, "init_args", None)
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if name == "ModelParallelStrategy" and args is not None and str(devices).isdigit():
        dp, tp = args.get("data_parallel_size", "auto"), args.get("tensor_parallel_size", "auto")
        if isinstance(dp, int) and isinstance(tp, int) and dp * tp != int(devices) * nodes:
            raise ConfigError(f"trainer.strategy.init_args.data_parallel_size: {dp} x tensor_parallel_size {tp} "
                              f"must equal the processes, trainer.devices {devices} x num_nodes {nodes}")


def cli_class():
    """(the run CLI class, the objective base, the data module base, the config saver) for
    LightningCLI; built on demand so that importing this module needs no torch."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from ftbench.backbone import Backbone
    from ftbench.bench import PeakMemory, RunRecorder, Throughput
    from ftbench.bench.record import jsonable, portable, portable_paths, redact
    from ftbench.errors import ConfigError
    from ftbench.objectives.base import Objective
    from ftbench.tuners.base import Tuner

    class RedactedSaveConfig(SaveConfigCallback):
        """Lightning's config.yaml in the log folder, with secret-looking values redacted."""

        def setup(self, trainer, pl_module, stage) -> None:
            if self.already_saved:
                return
            # trainer.log_dir broadcasts under DDP: every rank reads it, or the ranks' collectives pair up wrong and hang
            log_dir = trainer.log_dir if self.save_to_log_dir else None
            if self.save_to_log_dir and trainer.is_global_zero:
                import yaml

                from ftbench.fileio import write_text_atomic

                text = yaml.safe_dump(jsonable(redact(portable_paths(self.config.clone().as_dict()))), sort_keys=False)
                write_text_atomic(os.path.join(log_dir, self.config_filename), text)
            if trainer.is_global_zero:
                self.save_config(trainer, pl_module, stage)
                self.already_saved = True
            self.already_saved = trainer.strategy.broadcast(self.already_saved)

    class FTBenchCLI(LightningCLI):
        """LightningCLI with a shared backbone and tuner, measurement callbacks and one record per run."""

        recorder: Optional[RunRecorder] = None
        argv: list[str] = []  # the command line, for the one-line parser errors (ftbench.argerrors)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(Backbone, "backbone", fail_untyped=True)
            parser.add_subclass_arguments(Tuner, "tuner", required=True, fail_untyped=True,
                                          help="What trains: configs/tuner/*.yaml (full, freeze, lora, ..., none).")
            parser.link_arguments("backbone", "model.init_args.backbone", apply_on="instantiate")
            parser.link_arguments("tuner", "model.init_args.tuner", apply_on="instantiate")
            parser.link_arguments("backbone", "data.init_args.backbone", apply_on="instantiate")
            parser.add_argument("--out", type=str, default="runs", help="Directory of the run records.")
            parser.add_argument("--run_id", type=Optional[str], default=None,
                                help="Record name (default: derived from the resolved config).")
            parser.add_argument("--save_weights", type=bool, default=False,
                                help="Keep what the method trained under {out}/{run_id}/weights.")
            parser.add_argument("--test_after_fit", type=bool, default=True,
                                help="After fit, run test (exact match on the held-out set).")
            parser.add_argument("--validate_before_fit", type=bool, default=False,
                                help="Validate once before training; the record keeps it as 'initial' "
                                     "(the before/after change, e.g. forgetting on a general-text set).")
            parser.add_argument("--warmup_batches", type=int, default=2,
                                help="Training batches left out of the throughput figures.")
            parser.add_argument("--overwrite", type=bool, default=False,
                                help="Replace the completed record of the same run in --out (refused otherwise).")
            from ftbench.evaluation.evaluator import Evaluator
            from ftbench.evaluation.options import EvaluationOptions

            parser.add_class_arguments(EvaluationOptions, "evaluate", fail_untyped=True,
                                       help="How the run is evaluated: the generation budget, generation in "
                                            "validation, the predictions file and lm-evaluation-harness tasks "
                                            "(ftbench.evaluation).")
            # one evaluator per run, from these options and the data module's metric specs, handed to the
            # objective as the tuner is
            parser.link_arguments(("evaluate", "data"), "model.init_args.evaluator", compute_fn=Evaluator,
                                  apply_on="instantiate")

        def init_parser(self, **kwargs):
            # every parser (the main one and each subcommand's) says a refusal in one line
            from ftbench.argerrors import install

            parser = super().init_parser(**kwargs)
            install(parser, self.argv)
            return parser

        def _cfg(self):
            return self.config[self.subcommand] if self.subcommand else self.config

        def before_instantiate_classes(self) -> None:
            cfg = self._cfg()
            plain = cfg.clone().as_dict()
            self.identity = identity(self, self.config)
            if not cfg.run_id:
                self.run_id = self.identity.run_id
            else:
                from ftbench.fileio import check_file_name

                self.run_id = check_file_name(cfg.run_id, "--run_id")
            check_out(cfg.out)
            check_strategy(cfg.trainer)
            check_not_completed(os.path.join(cfg.out, f"{self.run_id}.json"), cfg.overwrite)
            if self.subcommand == "fit" and cfg.trainer.get("max_steps") == 0:
                raise ConfigError("trainer.max_steps: 0 trains nothing (a run recorded 'completed' with no step); "
                                  "evaluate without training with `ftbench test`")
            refusal = random_init_refusal(cfg, self.subcommand)
            if refusal:
                raise ConfigError(refusal)
            if not cfg.trainer.get("default_root_dir"):
                cfg.trainer.default_root_dir = os.path.join(cfg.out, self.run_id)
            self.run_config = redact(portable(plain))
            seed = cfg.get("seed_everything")
            data_args = (cfg.get("data") or {}).get("init_args")
            if isinstance(seed, int) and not isinstance(seed, bool) and data_args is not None \
                    and "order_seed" in data_args and data_args.get("order_seed") is None:
                # the run's seed orders its training data (the split keeps data.seed); the record
                # keeps order_seed as given (None = the run's seed), so seeds stay one grid point
                data_args.order_seed = seed
            self.lm_eval_plan = None
            ev = cfg.get("evaluate")
            if ev is not None and ev.get("lm_eval_tasks") and self.subcommand in ("fit", "test"):
                # resolved (data sets loaded) now: a missing task is an error before any training
                from ftbench.evaluation import lm_eval
                from ftbench.evaluation.options import EvaluationOptions

                opts = EvaluationOptions(**ev.as_dict())
                self.lm_eval_plan = lm_eval.plan(opts.lm_eval_tasks, opts.lm_eval_include_path, opts.lm_eval_limit,
                                                 opts.lm_eval_num_fewshot, opts.lm_eval_batch_size,
                                                 opts.lm_eval_apply_chat_template)

        @staticmethod
        def _seed(cfg):
            """The seed actually used (Lightning draws one for ``seed_everything: true``)."""
            seed = cfg.get("seed_everything")
            if isinstance(seed, bool) or seed is None:
                drawn = os.environ.get("PL_GLOBAL_SEED")
                return int(drawn) if drawn is not None else seed
            return seed

        def instantiate_trainer(self, **kwargs):
            cfg = self._cfg()
            if "wandb" in str(cfg.trainer.get("logger")).lower():
                from ftbench.wandb_mode import offline_unless_reachable

                offline_unless_reachable()
            trainer = super().instantiate_trainer(**kwargs)
            weights = os.path.join(cfg.out, self.run_id, "weights") if cfg.save_weights else None
            import json

            # entries a sweep adds to the record (a search trial's study and number), never settings
            extra = json.loads(os.environ.get("FTBENCH_RUN_INFO") or "{}")
            self.recorder = RunRecorder(
                os.path.join(cfg.out, f"{self.run_id}.json"),
                {"run_id": self.run_id, "subcommand": self.subcommand, "seed": self._seed(cfg),
                 "config": self.run_config, "settings": self.identity.settings, **extra},
                save_weights_to=weights, method=self.identity.label,
            )
            from ftbench.bench.memory import MemoryBreakdown

            # the breakdown's step is the last warm-up batch: its hooks never slow a timed one
            breakdown = MemoryBreakdown(batch_index=max(0, cfg.warmup_batches - 1))
            trainer.callbacks.extend([PeakMemory(), breakdown, self.recorder])
            # first, so that its batch-end mark comes before the progress bar redraws (outside the timed batch)
            trainer.callbacks.insert(0, Throughput(cfg.warmup_batches))
            if os.environ.get("FTBENCH_PROGRESS_FILE"):  # set by `ftbench sweep` for its live view
                from ftbench.sweep.progress import ProgressFile

                trainer.callbacks.append(ProgressFile(os.environ["FTBENCH_PROGRESS_FILE"]))
            self.pruning = None
            if os.environ.get("FTBENCH_SEARCH_TRIAL") and self.subcommand == "fit":  # a search trial with a pruner
                from ftbench.bench.pruning import PruneOnValidation

                self.pruning = PruneOnValidation.from_env(os.environ["FTBENCH_SEARCH_TRIAL"])
                trainer.callbacks.append(self.pruning)
            if "wandb" in str(cfg.trainer.get("logger")).lower():
                from ftbench.wandb_mode import start_or_offline

                start_or_offline(trainer)
            for logger in trainer.loggers:
                logger.log_hyperparams({"config": self.run_config, "run_id": self.run_id})
            return trainer

        def before_fit(self) -> None:
            if self.model.train_batch_repeats > 1:  # GRPO reusing a rollout: the same prompts at each of its updates
                self.datamodule.train_batch_repeats = self.model.train_batch_repeats
            if self._cfg().validate_before_fit:
                self.recorder.initial_phase = True
                self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
                self.recorder.initial_phase = False

        def after_fit(self) -> None:
            cfg = self._cfg()
            if getattr(self, "pruning", None) is not None and self.pruning.pruned:
                # the search's pruner stopped it: no test (a pruned trial is never the chosen one)
                self.recorder.finish(self.trainer, status="pruned")
                return
            if cfg.test_after_fit and hasattr(self.datamodule, "test_dataloader"):
                splits = getattr(self.datamodule, "splits", None) or {}
                if "test" in splits and not splits["test"]:
                    print("ftbench: warning: the data has no test rows (test_fraction 0 and no test_source): no test "
                          "metrics, and the report's exact match column stays empty for this run", file=sys.stderr)
                else:
                    self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            self._lm_eval()
            self._finish()

        def after_validate(self) -> None:
            self._finish()

        def after_test(self) -> None:
            self._lm_eval()
            self._finish()

        def _lm_eval(self) -> None:
            """The planned lm-evaluation-harness tasks on the trained model (rank 0), into the record."""
            plan = getattr(self, "lm_eval_plan", None)
            if plan is None or not self.trainer.is_global_zero or self.recorder is None:
                return
            from ftbench.evaluation import lm_eval

            try:
                summary, final = lm_eval.run(self.model, plan)
            except BaseException as err:
                self.recorder.mark_failed(err)
                raise
            self.recorder.record_lm_eval(summary, final)
            for logger in self.trainer.loggers:
                logger.log_metrics(final, step=self.trainer.global_step)

        def _finish(self) -> None:
            if self.recorder is not None:
                self.recorder.finish(self.trainer)
                if self.trainer.is_global_zero:
                    from ftbench.sweep.report import summary_line

                    print(summary_line(self.recorder.record), flush=True)

    return FTBenchCLI, Objective, L.LightningDataModule, RedactedSaveConfig


# ---------------------------------------------------------------------------- reading a command line
def read_run(argv: list[str]) -> RunIdentity:
    """The identity of the run ``ftbench ARGV`` would make (``ARGV``: the subcommand and its arguments),
    read by the run's own parser (:func:`parse_run`), nothing instantiated."""
    return identity(run_parser(), parse_run(argv))


def parse_run(argv: list[str]):
    """``ARGV`` parsed by the run's parser (:func:`run_parser`) as ``ftbench`` parses it, less the final
    validation (:func:`validation_problem`: a point that lacks a required key still has an id). A command
    line the parser refuses is a :class:`~ftbench.errors.ConfigError` with the parser's message."""
    from ftbench.errors import ConfigError

    try:
        return run_parser().parser.parse_args(argv, _skip_validation=True)
    except Exception as err:  # jsonargparse's ArgumentError, or an error of a class it imports
        raise ConfigError(" ".join(str(err).split()) or type(err).__name__) from None


def validation_problem(config) -> Optional[str]:
    """What the run's parser refuses in a config from :func:`parse_run` (a required key missing), else None."""
    try:
        run_parser().parser.validate(config)
    except Exception as err:  # jsonargparse's own errors: the message names the key
        return " ".join(str(err).split()) or type(err).__name__
    return None


@functools.lru_cache(maxsize=1)
def run_parser():
    """A LightningCLI of a run with its parser built and nothing parsed (building it takes ~1-2 s:
    once per process). Its parser raises instead of exiting."""
    FTBenchCLI, Objective, DataModule, SaveConfig = cli_class()

    class Built(Exception):
        pass

    class ParserOnly(FTBenchCLI):
        def parse_arguments(self, parser, args) -> None:
            raise Built(self)

    try:
        ParserOnly(Objective, DataModule, save_config_callback=SaveConfig, args=[], **CLI_KWARGS)
    except Built as built:
        cli = built.args[0]
    for parser in (cli.parser, *cli._subcommand_parsers.values()):
        parser.exit_on_error = False
    return cli


def random_init_refusal(cfg, subcommand: Optional[str]) -> Optional[str]:
    """Why a run of random weights (``backbone.random_init: true``) cannot go as configured, or None.
    Its accuracy measures nothing, so no study may report one: every setting that measures accuracy
    (the test stage, answers generated in validation, lm-evaluation-harness tasks) is refused; its
    memory, speed and losses are what it is for."""
    if not (cfg.get("backbone") or {}).get("random_init"):
        return None
    why = "backbone.random_init: true trains random weights, whose accuracy measures nothing"
    evaluate = cfg.get("evaluate") or {}
    if subcommand == "test":
        return f"{why}: `ftbench test` refused (measure its memory and speed with fit --test_after_fit false)"
    if subcommand == "fit" and cfg.get("test_after_fit"):
        return f"{why}: set --test_after_fit false"
    if evaluate.get("generate_in_validation"):
        return f"{why}: set --evaluate.generate_in_validation false (validation keeps its loss)"
    if evaluate.get("lm_eval_tasks"):
        return f"{why}: --evaluate.lm_eval_tasks refused"
    return None


def check_out(out: str) -> None:
    """``--out`` must be a folder this process can write in: checked before any work, so that a run
    never trains for minutes and then fails to write its record."""
    import tempfile

    from ftbench.errors import OutputError

    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"--out {out}: exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ftbench-write-check-"):
            pass
    except OSError as err:
        raise OutputError(f"--out {out}: cannot write there ({err.strerror or err})") from None


def check_not_completed(record: str, overwrite: bool) -> None:
    """A completed record is never replaced by a run that has not completed, unless asked."""
    import json

    from ftbench.errors import OutputError

    try:
        with open(record) as f:
            status = json.load(f)["train_info"]["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if status == "completed" and not overwrite:
        err = OutputError(f"{record}: this run has a completed record; running it again would replace it")
        err.hint = "add --overwrite true to replace it, or give another --out"
        raise err


class _StderrOnly:
    """A logging filter that writes a record to stderr and keeps it from the logger's own handlers."""

    def filter(self, record) -> bool:
        print(f"[{record.levelname}] {record.getMessage()}", file=sys.stderr)
        return False


def quiet_environment() -> None:
    import logging

    from ftbench.wandb_mode import default_to_offline

    default_to_offline()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed's logger writes to stdout (at its import: "Setting accelerator to CPU ..."), which is where
    # `--print_config` prints the config: its lines go to stderr (a filter on the logger outlives the
    # handler DeepSpeed adds to it when it is imported later)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _StderrOnly) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_StderrOnly())


def die_with_parent() -> None:  # pragma: no cover - a sweep runs it in the child between fork and exec
    """SIGKILL this process when its parent dies (kill -9 included; Linux only, a no-op elsewhere).

    A sweep's run dies with the sweep, so that no orphan keeps writing the record and the record
    stays ``running`` for the next invocation to rerun; under DDP the ranks above 0 (children of
    rank 0) die with rank 0 instead of waiting for a collective until gloo's/NCCL's timeout."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
