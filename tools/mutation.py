"""Mutation testing of the core with mutmut: one module at a time, against its matching tests only.

    python tools/mutation.py [MODULE ...]     # default: every module in MODULES, smallest first
    python tools/mutation.py --survivors MODULE  # after adding tests: rerun only the last run's survivors
    python tools/mutation.py --report-only MODULE  # tabulate the last (possibly interrupted) run
    python tools/mutation.py --list

For each module, a work folder ``build/mutation/<module>/`` gets links to this checkout's ``src/``
and ``tests/`` and a ``pyproject.toml`` whose ``[tool.mutmut]`` names the module's files and test
files. mutmut copies them into ``build/mutation/<module>/mutants/`` and mutates only that copy:
the checkout's sources are never touched. Each run starts from a fresh copy (a kept one would hold
stale copies of the modules it does not mutate).

Writes ``build/mutation/<module>.txt`` (every mutant and its status) and ``build/mutation/report.md``
(the score table and the survivors, to paste into docs/TESTING.md). Score = killed / (mutants -
equivalent), where a timeout counts as killed and "no tests" (no selected test calls the function)
as survived. Equivalent mutants are listed in EQUIVALENT with the reason; see docs/TESTING.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"
PACKAGE = "crossdistill"


@dataclass
class Module:
    files: list[str]
    """Files to mutate, relative to src/crossdistill."""
    tests: list[str]
    """pytest arguments selecting the matching tests (files or node ids)."""
    functions: list[str] = field(default_factory=list)
    """Only these functions / classes (mutmut mutant-name globs after the module path); default: all."""


MODULES: dict[str, Module] = {
    "sampling": Module(["engine/sampling.py"], ["tests/engine/test_sampling.py"]),
    "projectors": Module(["models/projectors.py"], ["tests/models/test_projectors.py"]),
    "losses": Module(["losses/*.py"], ["tests/losses"]),
    "teacher": Module(["models/teacher.py"], ["tests/models/test_teacher.py"]),
    # tests/models/test_adapter.py builds the paper models at 224 px (minutes a run); the tiny file runs in seconds
    "adapter": Module(["models/adapter.py"], ["tests/models/test_adapter_tiny.py"]),
    "files": Module(["files.py"], ["tests/test_files.py"]),
    "checkpoint": Module(["checkpoint.py"], ["tests/test_checkpoint.py"]),
    # the key and the store (with the widths it is built with and the rows it hands back);
    # the loader wrapper (WithIndex) is not in scope
    "teacher_cache": Module(
        ["engine/teacher_cache.py"],
        [
            "tests/engine/test_teacher_cache_store.py",
            "tests/engine/test_teacher_cache.py::test_the_key_changes_with_teacher_seed_augmentation_and_data",
            "tests/engine/test_teacher_cache.py::test_lookup_validates_indices",
            "tests/engine/test_teacher_cache.py::test_a_setup_failure_on_rank_0_stops_every_rank",
        ],
        functions=[
            "state_dict_sha256",
            "_file_identity",
            "cache_key",
            "key_digest",
            "_reserve_blocks",
            "_row_crc",
            "_Store",
            "TeacherCache",
            "cache_widths",
            "prefetched_outputs",
        ],
    ),
    "config": Module(["config.py"], ["tests/test_config.py"]),
}

EQUIVALENT: dict[str, str] = {
    "crossdistill.engine.sampling.xǁSampleSeededDatasetǁ__getattr____mutmut_4": "AttributeError(None) for AttributeError('dataset'): the error only tells getattr and unpickling that "
    "the wrapped dataset is not set yet; its message is never shown",
    "crossdistill.models.projectors.xǁAADProjectorǁ__init____mutmut_27": "nn.Linear(..., bias=None) for bias=False: nn.Linear only tests `if bias`, None and False alike",
    "crossdistill.models.projectors.xǁAADProjectorǁ__init____mutmut_35": "nn.Linear(..., bias=None) for bias=False, the second Linear: same as above",
    "crossdistill.losses.fitnet.x_fitnet_loss__mutmut_18": "autocast enabled (by default) around sub, pow and mean: same as enabled=True just below",
    "crossdistill.losses.fitnet.x_fitnet_loss__mutmut_19": "autocast enabled=True around sub, pow and mean: none of them is on autocast's lower-precision lists "
    "(CPU or CUDA), and float32/float64 inputs are never cast down; the guard is defensive",
    "crossdistill.losses.fitnet.x_fitnet_loss__mutmut_22": "student.to(None) instead of .to(dtype): the subtraction promotes to the wider dtype, exactly the cast "
    "the original makes",
    "crossdistill.losses.fitnet.x_fitnet_loss__mutmut_23": "teacher.to(None) instead of .to(dtype): same as above",
    "crossdistill.losses.rsd.x_batch_standardize__mutmut_6": "the batch mean without keepdim=True: a mean over dimension 0 broadcasts against x the same with or "
    "without the leading 1 (broadcasting aligns trailing dimensions)",
    "crossdistill.losses.rsd.x_batch_standardize__mutmut_8": "the batch mean with keepdim=False: same as above",
    "crossdistill.losses.rsd.x_batch_standardize__mutmut_13": "the batch variance without keepdim=True: same as above",
    "crossdistill.losses.rsd.x_batch_standardize__mutmut_17": "the batch variance with keepdim=False: same as above",
    "crossdistill.losses.kd.x_kd_loss__mutmut_22": "autocast enabled (by default) around the loss: none of its ops (log_softmax, exp, sub, mul, sum, mean) is on "
    "autocast's lower-precision lists (CPU or CUDA), and the float32/float64 inputs it computes on are never cast "
    "down; the guard is defensive, as in fitnet_loss",
    "crossdistill.losses.kd.x_kd_loss__mutmut_23": "autocast enabled=True around the loss: same as above",
    "crossdistill.losses.ofa.x_ofa_loss__mutmut_23": "autocast enabled (by default) around the loss: softmax, log_softmax and pow are on CUDA's float32 list, "
    "which leaves float32 as it is and never touches float64; the rest is on no list: same as kd_loss",
    "crossdistill.losses.ofa.x_ofa_loss__mutmut_24": "autocast enabled=True around the loss: same as above",
    "crossdistill.losses.ofa.x_ofa_loss__mutmut_50": "sum(dim=+1) for sum(dim=-1): the logits are checked to be 2-D, so the last dimension is dimension 1",
    "crossdistill.losses.sdd.x_sdd_kd_loss__mutmut_24": "autocast enabled (by default) around the loss: same as kd_loss (argmax, where and ones, the weights' "
    "ops, are on no list either)",
    "crossdistill.losses.sdd.x_sdd_kd_loss__mutmut_25": "autocast enabled=True around the loss: same as above",
    "crossdistill.losses.sdd.x_sdd_kd_loss__mutmut_53": "region weights not cast to the loss dtype: they are float32 or float64 (loss_dtype of the teacher) and never "
    "wider than the per-region losses, so the product promotes them to the loss dtype, the same cast",
    "crossdistill.losses.dkd.x_decouple_target__mutmut_30": "the column indices [K-1] not expanded to [..., K-1]: adding (columns >= label) with label [..., 1] "
    "broadcasts them to that shape anyway",
    "crossdistill.losses.dkd.x_dkd_loss__mutmut_37": "autocast enabled (by default) around the loss: same as kd_loss (gather, cat and logsumexp included: cat "
    "only promotes to the widest of its inputs, all of one dtype here)",
    "crossdistill.losses.dkd.x_dkd_loss__mutmut_38": "autocast enabled=True around the loss: same as above",
    "crossdistill.losses.dist.x_dist_loss__mutmut_24": "autocast enabled (by default) around the loss: same as kd_loss (norm is on CUDA's float32 list, which leaves "
    "float32 as it is)",
    "crossdistill.losses.dist.x_dist_loss__mutmut_25": "autocast enabled=True around the loss: same as above",
    "crossdistill.losses.sdd.x_complementary_mask__mutmut_12": "argmax != label for argmax == label: every flag is negated, and the mask compares each region's flag with "
    "the global one (an exclusive or), which negating both leaves unchanged",
    "crossdistill.losses.sdd.x_sdd_dkd_loss__mutmut_25": "labels.to(None) for labels.to(the logits' device): decouple_target moves the labels to the logits' device "
    "itself",
    "crossdistill.losses.sdd.x_sdd_dkd_loss__mutmut_38": "autocast enabled (by default) around the loss: same as kd_loss (gather, cat and logsumexp included: cat "
    "only promotes to the widest of its inputs, all of one dtype here)",
    "crossdistill.losses.sdd.x_sdd_dkd_loss__mutmut_39": "autocast enabled=True around the loss: same as above",
    "crossdistill.losses.sdd.x_sdd_dkd_loss__mutmut_84": "region weights not cast to the loss dtype: same as sdd_kd_loss",
    "crossdistill.losses.at.x_at_loss__mutmut_28": "autocast enabled (by default) around the loss: none of its ops (abs, pow, mean, interpolate, norm, div, sub) is on autocast's lower-precision lists (CPU or CUDA), and its float32/float64 inputs are never cast",
    "crossdistill.losses.at.x_at_loss__mutmut_29": "autocast enabled=True around the loss: same as above",
    "crossdistill.losses.at.x_at_loss__mutmut_52": "F.normalize(a_s.flatten(1)) without dim=1: the default dim is 1",
    "crossdistill.losses.at.x_at_loss__mutmut_59": "F.normalize(a_t.flatten(1)) without dim=1: same as above",
    "crossdistill.losses.cc.x_cc_loss__mutmut_23": "autocast enabled (by default) around the loss: none of its ops (sub, abs, mul, sum, mean) is on autocast's lower-precision lists (CPU or CUDA), and its float32/float64 inputs are never cast",
    "crossdistill.losses.cc.x_cc_loss__mutmut_24": "autocast enabled=True around the loss: same as above",
    "crossdistill.losses.cc.x_cc_loss__mutmut_27": "student.to(None) (its own dtype) before the subtraction: subtracting the teacher in the loss dtype promotes it to that dtype exactly (float32 and bfloat16 values are exact in float32 and float64)",
    "crossdistill.losses.cc.x_cc_loss__mutmut_28": "teacher.to(None) before the subtraction: same as above",
    "crossdistill.losses.crd.x_crd_nce_loss__mutmut_14": "autocast enabled (by default) around the loss: none of its ops (div, add, log, sum) is on autocast's lower-precision lists (CPU or CUDA), and its float32/float64 inputs are never cast",
    "crossdistill.losses.crd.x_crd_nce_loss__mutmut_15": "autocast enabled=True around the loss: same as above",
    "crossdistill.losses.crd.x_bank_contrast_exp__mutmut_50": "the bank always copied for the product, also when no gradient will need it: the same values, one more copy",
    "crossdistill.losses.rkd.x_rkd_angles__mutmut_3": "F.normalize(p=None): the norm of p=None is the 2-norm, as p=2",
    "crossdistill.losses.rkd.x_rkd_angles__mutmut_6": "F.normalize without p=2: the default p is 2",
    "crossdistill.losses.rkd.x_rkd_distances__mutmut_37": "the diagonal's zero as a float32 0-dim tensor: a 0-dim tensor does not change the result dtype of torch.where beside a float64 tensor",
    "crossdistill.losses.rkd.x_rkd_distances__mutmut_40": "the diagonal's zero without dtype=: same as above",
    "crossdistill.losses.rkd.x_rkd_distances__mutmut_38": "the diagonal's zero on the CPU: torch.where takes a 0-dim CPU tensor beside tensors of any device",
    "crossdistill.losses.rkd.x_rkd_distances__mutmut_41": "the diagonal's zero without device=: same as above",
    "crossdistill.models.adapter.x_is_channels_last__mutmut_3": 'getattr(model, "output_fmt", None) for the default "NCHW": the value is only compared with "NHWC", which '
    "neither default equals",
    "crossdistill.models.adapter.x_is_channels_last__mutmut_9": 'the default "XXNCHWXX": same as above',
    "crossdistill.models.adapter.x_is_channels_last__mutmut_10": 'the default "nchw": same as above',
    "crossdistill.models.adapter.x_num_prefix_tokens__mutmut_5": 'getattr(model, "num_prefix_tokens", None) for the default 0: both are turned into 0 by the `or 0` that follows',
    "crossdistill.models.teacher.xǁTeacherǁprepare__mutmut_14": "F.interpolate(align_corners=None) for align_corners=False: None means False for the bilinear mode",
    "crossdistill.models.teacher.xǁTeacherǁprepare__mutmut_19": "F.interpolate without align_corners: same as above",
    "crossdistill.models.teacher.xǁTeacherǁprepare__mutmut_7": "x.shape[+2:] for x.shape[-2:]: the batch is [B, C, H, W], where both are (H, W)",
    "crossdistill.models.teacher.xǁTeacherǁprepare__mutmut_8": "x.shape[-3:] never equals (size, size), so a batch already at the teacher's size is resized too: bilinear to the same size (align_corners=False, no antialias) returns the same values bit for bit",
    "crossdistill.models.teacher.xǁTeacherǁ__init____mutmut_8": '_shift starts as "" instead of None: it is read only when _scale is set, which sets _shift too',
    "crossdistill.models.teacher.xǁTeacherǁ__init____mutmut_29": "_scale viewed [3, 1, 1] instead of [1, 3, 1, 1]: broadcast over a [B, 3, H, W] batch it is the same product, "
    "and the cache key flattens it",
    "crossdistill.models.teacher.xǁTeacherǁ__init____mutmut_44": "_shift viewed [3, 1, 1]: same as above",
    "crossdistill.engine.teacher_cache.x__row_crc__mutmut_2": "view(None) for view(np.uint8) before zlib.crc32: crc32 reads the row's bytes through the buffer protocol, whatever the view's dtype",
    "crossdistill.engine.teacher_cache.x__row_crc__mutmut_10": "reshape(N, -2) for reshape(N, -1): numpy takes any negative size as the one to infer",
    "crossdistill.engine.teacher_cache.x__row_crc__mutmut_12": "np.fromiter(dtype=None) gives float64 CRCs: exact below 2**53, and stored into the int64 check file",
    "crossdistill.engine.teacher_cache.x__row_crc__mutmut_16": "np.fromiter without count=: count only pre-sizes the array",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁwrite__mutmut_3": "astype(copy=None) for copy=False before writing into the memmap: a copy or not, the same bytes are written",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁwrite__mutmut_5": "astype without copy=: same as above",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁwrite__mutmut_6": "astype(copy=True): same as above",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁclose__mutmut_1": "no flush on close: flush is msync, which only matters if the OS crashes; the pages of a shared file mapping reach other processes and the file without it",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁclose__mutmut_2": 'data = check = "" after close instead of None: nothing reads them until begin_epoch makes new stores',
    "crossdistill.engine.teacher_cache.xǁTeacherCacheǁepoch_complete__mutmut_6": "np.load(mmap_mode=None): the check file read whole instead of mapped, same values",
    "crossdistill.engine.teacher_cache.xǁTeacherCacheǁepoch_complete__mutmut_8": "np.load without mmap_mode: same as above",
    "crossdistill.engine.teacher_cache.xǁTeacherCacheǁread_rows__mutmut_5": "np.asarray([index], dtype=None): a Python int list is int64 already",
    "crossdistill.engine.teacher_cache.xǁTeacherCacheǁread_rows__mutmut_7": "np.asarray([index]) without dtype: same as above",
    "crossdistill.engine.teacher_cache.xǁTeacherCacheǁ__init____mutmut_27": 'the directory name keeps "XX-_.XX" characters instead of "-_.": X is alphanumeric, kept anyway',
    "crossdistill.engine.teacher_cache.xǁTeacherCacheǁlookup__mutmut_8": "np.asarray(indices.numpy(), dtype=None): torch's index tensors are int64 already",
    "crossdistill.engine.teacher_cache.xǁTeacherCacheǁlookup__mutmut_10": "np.asarray(indices.numpy()) without dtype: same as above",
    "crossdistill.engine.teacher_cache.xǁTeacherCacheǁlookup__mutmut_59": "rows kept float64 instead of cast to the store dtype: float32 values widened exactly, then cast once when stored and when copied into the stored rows, the same rounding",
    "crossdistill.engine.teacher_cache.xǁTeacherCacheǁlookup__mutmut_68": "ok & missing for ok | missing in found[name]: the flags are never read after that line",
    "crossdistill.engine.teacher_cache.xǁTeacherCacheǁlookup__mutmut_78": ".to(device) without non_blocking=True: the same values, only the copy's overlap with host work differs",
    "crossdistill.engine.teacher_cache.xǁTeacherCacheǁlookup__mutmut_81": ".to(device, non_blocking=False): same as above",
    "crossdistill.engine.teacher_cache.x_prefetched_outputs__mutmut_5": "the rows a batch carries moved with .to(device) without non_blocking=True: the same values, only the copy's overlap with host work differs",
    "crossdistill.engine.teacher_cache.x_prefetched_outputs__mutmut_6": ".to(device, non_blocking=False): same as above",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁ_create__mutmut_17": "write_path_atomic(hint=None) for a new store file: its NoSpaceError, the only thing the hint is used in, is caught on the next lines and replaced by the message naming the file and its size",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁ__init____mutmut_7": 'data = "" before open() instead of None: nothing reads it before open() sets it (close() runs only on opened stores)',
    "crossdistill.engine.teacher_cache.xǁ_Storeǁ__init____mutmut_8": 'check = "" before open(): same as above',
    "crossdistill.engine.teacher_cache.xǁ_Storeǁ_create__mutmut_20": "tmp.unlink(missing_ok=None) in finally: the temporary file exists there (os.link keeps it)",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁ_create__mutmut_21": "tmp.unlink(missing_ok=False): same as above",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁ_validate__mutmut_8": "np.load(mmap_mode=None) while validating: reads the file whole instead of mapping it, same shape and dtype checks",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁ_validate__mutmut_10": "np.load without mmap_mode: same as above",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁ_validate__mutmut_15": "the check file loaded with mmap_mode=None: same as above",
    "crossdistill.engine.teacher_cache.xǁ_Storeǁ_validate__mutmut_17": "the check file loaded without mmap_mode: same as above",
    "crossdistill.files.x__umask__mutmut_3": "os.umask(0o023) for os.umask(0o022) while reading the mask: it is put back on the next line, the value "
    "set in between is never used",
    "crossdistill.files.x_write_text_atomic__mutmut_9": 'text.encode("UTF-8") for "utf-8": Python\'s codec names are case-insensitive',
    "crossdistill.files.x_write_path_atomic__mutmut_4": 'folder = "" instead of None before mkdtemp: when the folder could not be made, the finally block runs '
    'shutil.rmtree("", ignore_errors=True), which fails to find "" and ignores it, as skipping it does',
    "crossdistill.config.xǁRunConfigǁto_yaml__mutmut_2": "yaml.safe_dump(sort_keys=None) for sort_keys=False: PyYAML only tests `if self.sort_keys`",
    "crossdistill.config.x__type_name__mutmut_15": "the name of a generic's origin with the fallback None instead of str(origin): every annotation "
    "_convert reports a type error for is a class, a generic of tuple, list or dict, or a union of those, and these "
    "origins all have a __name__, so the fallback is never used",
    "crossdistill.config.x__type_name__mutmut_18": "the same fallback dropped (getattr without a default): same as above",
    "crossdistill.config.x__type_name__mutmut_21": "the same fallback as str(None): same as above",
    "crossdistill.config.x__type_name__mutmut_24": "the name of a plain type with the fallback None instead of str(tp): the plain types _convert "
    "reports (bool, int, float, str, dataclasses) are classes with a __name__",
    "crossdistill.config.x__type_name__mutmut_27": "the same fallback dropped: same as above",
    "crossdistill.config.x__type_name__mutmut_30": "the same fallback as str(None): same as above",
}
"""mutant name -> why no test can tell it from the original (it behaves identically)."""

KILLED = {"killed", "timeout", "caught by type check"}
NOT_CHECKED = "not checked"  # an interrupted run: left out of the score, counted in the table


def mutmut(*args: str, cwd: Path, log) -> str:
    """Run the mutmut CLI of this interpreter in ``cwd``; its output goes to ``log`` and is returned."""
    command = [
        sys.executable,
        "-c",
        "import sys; from mutmut.__main__ import cli; sys.argv[0] = 'mutmut'; cli()",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # mutmut puts mutants/src first on sys.path; a src/ on PYTHONPATH would shadow the mutated copy
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not (cwd / p).resolve().name == "src"]
    env["PYTHONPATH"] = os.pathsep.join([str(WORK / PLUGIN_FOLDER), *paths])
    done = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write(done.stdout)
    log.flush()
    if done.returncode != 0:
        raise SystemExit(f"mutmut {' '.join(args)} failed in {cwd} (exit {done.returncode}); see {log.name}")
    return done.stdout


PLUGIN_FOLDER = "pytest_plugins"
ONE_THREAD_PLUGIN = "mutation_one_thread"
ONE_THREAD_SOURCE = '''"""Written by tools/mutation.py: one torch thread in every test of a mutation run.

tests/conftest.py sets two threads before each test (an autouse fixture, which OMP_NUM_THREADS does not
override); mutmut runs one mutant at a time on a shared machine, where a second thread only competes.
This hook runs after the fixtures, just before the test itself."""

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    import torch

    torch.set_num_threads(1)
    yield
'''


def write_plugin() -> None:
    folder = WORK / PLUGIN_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{ONE_THREAD_PLUGIN}.py").write_text(ONE_THREAD_SOURCE)


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def prepare(name: str, module: Module) -> Path:
    work = WORK / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for folder in ("src", "tests"):
        (work / folder).symlink_to(ROOT / folder, target_is_directory=True)
    pyproject = (ROOT / "pyproject.toml").read_text()
    only = [f"src/{PACKAGE}/{path}" for path in module.files]
    pyproject += (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {toml_list(only)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(module.tests)}\n"
        f'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "{ONE_THREAD_PLUGIN}", "-x", "-q"]\n'
        "use_git_change_detection = false\n"
        # torch: a child forked after the parent ran OpenMP ops can hang; fork from a server that ran none
        'process_isolation = "forkserver"\n'
    )
    (work / "pyproject.toml").write_text(pyproject)
    return work


def mutant_globs(module: Module) -> list[str]:
    if not module.functions:
        return []
    globs = []
    for path in module.files:
        dotted = f"{PACKAGE}." + path.removesuffix(".py").replace("/", ".")
        for function in module.functions:
            globs.append(f"{dotted}.x_{function}__mutmut_*")  # a module-level function
            globs.append(f"{dotted}.xǁ{function}ǁ*")  # the methods of a class
    return globs


def run_module(name: str, module: Module, *, mode: str = "run") -> dict[str, str]:
    """mode: "run" (a fresh run), "survivors" (rerun the last run's survivors against the current tests),
    "report" (only read the last run's results)."""
    fresh = mode == "run"
    work = prepare(name, module) if fresh else WORK / name
    if not fresh and not (work / "mutants").is_dir():
        raise SystemExit(f"no earlier run of {name} in {work}: run it first")
    with open(WORK / f"{name}.log", "w" if fresh else "a") as log:
        if fresh:
            mutmut("run", "--max-children", "1", *mutant_globs(module), cwd=work, log=log)
        elif mode == "survivors":
            last = (WORK / f"{name}.txt").read_text().splitlines()
            alive = [
                line.split(": ")[0]
                for line in last
                if line.split(": ")[1] not in KILLED | {NOT_CHECKED} and line.split(": ")[0] not in EQUIVALENT
            ]
            if alive:
                mutmut("run", "--max-children", "1", *alive, cwd=work, log=log)
        listing = mutmut("results", "--all", "true", cwd=work, log=log)
    status = {}
    for line in listing.splitlines():
        match = re.match(r"\s+(\S+): (.+)$", line)
        if match:
            status[match.group(1)] = match.group(2).strip()
    globs = mutant_globs(module)
    if globs:  # results lists every mutant of the files; keep those of the selected functions
        import fnmatch

        status = {k: v for k, v in status.items() if any(fnmatch.fnmatch(k, g) for g in globs)}
    (WORK / f"{name}.txt").write_text("".join(f"{k}: {v}\n" for k, v in sorted(status.items())))
    return status


def score_rows(results: dict[str, dict[str, str]]) -> tuple[list[str], list[str]]:
    rows, survivors = [], []
    for name, status in results.items():
        unchecked = [k for k, v in status.items() if v == NOT_CHECKED]
        equivalent = [k for k in status if k in EQUIVALENT]
        killed = [k for k, v in status.items() if v in KILLED and k not in EQUIVALENT]
        alive = sorted(k for k, v in status.items() if v not in KILLED | {NOT_CHECKED} and k not in EQUIVALENT)
        counted = len(killed) + len(alive)
        score = f"{100.0 * len(killed) / counted:.1f} %" if counted else "-"
        note = f" ({len(unchecked)} not checked)" if unchecked else ""
        rows.append(f"| {name} | {len(status)}{note} | {len(equivalent)} | {len(killed)} | {len(alive)} | {score} |")
        survivors += [f"- `{k}` ({status[k]})" for k in alive]
    return rows, survivors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--list", action="store_true", help="list the modules and their tests, then stop")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="do not run: tabulate the results already in build/mutation/ (e.g. of an interrupted run)",
    )
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="rerun only the last run's survivors (after adding tests), then tabulate",
    )
    args = parser.parse_args(argv)
    if args.list:
        for name, module in MODULES.items():
            print(f"{name}: {', '.join(module.files)} <- {' '.join(module.tests)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    WORK.mkdir(parents=True, exist_ok=True)
    write_plugin()
    results = {}
    for name in args.modules or list(MODULES):
        print(f"mutation: {name} ...", flush=True)
        mode = "report" if args.report_only else "survivors" if args.survivors else "run"
        results[name] = run_module(name, MODULES[name], mode=mode)
    rows, survivors = score_rows(results)
    equivalents = [
        f"- `{k}`: {reason}" for status in results.values() for k, reason in EQUIVALENT.items() if k in status
    ]
    report = "\n".join(
        [
            f"Run on {datetime.date.today().isoformat()} with mutmut, `make mutation`.",
            "",
            "| module | mutants | equivalent | killed | survived | score |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            "Survivors:" if survivors else "No survivors.",
            *survivors,
            "",
            "Equivalent mutants:" if equivalents else "No equivalent mutants.",
            *equivalents,
            "",
        ]
    )
    (WORK / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
