"""User mistakes, one line each (docs/reliability.md): command lines, config
values and fields, output paths, hand-edited run files, Ctrl-C and the
operating system's errors; each line names the fix and loses nothing."""

import errno
import os
import re
import runpy

import pytest

from dinorank_jax import errors, workdir as workdir_lib
from dinorank_jax.data import build, pipeline, records
from tests import commands, tiny_corpus
from tests.tiny_config import CONFIGS

ROOT = os.path.dirname(CONFIGS)


@pytest.mark.parametrize("flags, message", [
    (["--config.batchsize=8"], "unknown config field --config.batchsize: did you mean "
                               "--config.batch_size?"),
    (["--config.batch_size=abc"], "bad value 'abc' for --config.batch_size: expected an integer "
                                  "(the config has 128)"),
    (["--workdir=README.md"], "--workdir README.md is a file, not a directory: choose another "
                              "--workdir"),
    (["--config.checkpoint.every=0"], "config.checkpoint.every must be a number >= 1, got 0"),
    (["--config.model.rank_order=-1"], "config.model.rank_order must be an integer in 0..5"),
    (["--config.model.rank_order=7"], "config.model.rank_order must be an integer in 0..5"),
    (["--config.epochs=0"], "config.epochs must be a number >= 1, got 0"),
    (["--config.objective.rank_schedule=step"], "config.objective.rank_schedule must be one of"),
    (["--config.data.max_skip_fraction=1.5"], "config.data.max_skip_fraction must be in [0, 1)"),
])
def test_trainer_config_mistakes_are_one_line(tmp_path, flags, message):
  code, out = commands.run("dinorank_jax.main", "--config=configs/demo.py",
                       f"--workdir={tmp_path / 'run'}", *flags)
  assert code == 1 and "Traceback" not in out, out[-2000:]
  assert f"error: {message}" in out, out[-2000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("argv, message", [
    (["--config.model.embed_dimm=8"], "unknown config field --config.model.embed_dimm: did you "
                                      "mean --config.model.embed_dim?"),
    (["--config.optim.learning_rate=3"], "unknown config field --config.optim.learning_rate: "
                                         "did you mean --config.optim.lr?"),
    (["--config.model.rank_ordr=3"], "unknown config field --config.model.rank_ordr: did you "
                                     "mean --config.model.rank_order?"),
    (["--config.optm.lr=3"], "unknown config field --config.optm.lr: did you mean "
                             "--config.optim.lr?"),
    (["--config.model.rank_order=1.5"], "bad value '1.5' for --config.model.rank_order: "
                                        "expected an integer (the config has 3)"),
    (["--config.optim.lr=x"], "bad value 'x' for --config.optim.lr: expected a number "
                              "(the config has 0.002)"),
    (["--config.model.scan=maybe"], "bad value 'maybe' for --config.model.scan: expected true "
                                    "or false (the config has False)"),
    (["--config.model=3"], "bad value '3' for --config.model: expected one of its fields, set as "
                           "--config.model.FIELD=VALUE"),
    (["--num_processes=x"], "bad value 'x' for --num_processes: expected an integer"),
    (["--confg.epochs=3"], "unknown flag --confg.epochs: did you mean --config.epochs?"),
    (["--wrkdir=runs/x"], "unknown flag --wrkdir: did you mean --workdir?"),
])
def test_command_line_mistakes_name_the_flag_the_value_and_the_closest_field(argv, message,
                                                                            monkeypatch):
  """The errors absl and ml_collections raise, from main's flags on a fresh
  flag set, each made one line by `main._flag_error`."""
  from absl import flags as absl_flags
  from ml_collections import config_flags
  from dinorank_jax import main
  argv = ["main", "--config=configs/demo.py", *argv]
  fresh = absl_flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fresh, sys_argv=argv, lock_config=True)
  for flag in main.MAIN.flags[1:]:
    fresh[flag.name] = absl_flags.FLAGS[flag.name]
  monkeypatch.chdir(ROOT)
  with pytest.raises(Exception) as caught:
    fresh(argv)
  line = main._flag_error(caught.value, argv, main.MAIN)                # pylint: disable=protected-access
  assert line.removesuffix(" (python -m dinorank_jax.main --help lists the fields)") == message


def test_an_output_path_that_is_a_file_is_refused_before_any_work(tmp_path):
  """`--out` of every command that writes a directory: one line, the file
  untouched, before a dataset is read or a suite is run."""
  from dinorank_jax import export
  from dinorank_jax.evaluate import __main__ as evaluate
  from dinorank_jax.teacher import export as teacher_export
  taken = tmp_path / "notes.txt"
  taken.write_text("keep")
  commands = {
      "data.build": lambda out: build.main(["--source", "synthetic", "--out", out]),
      "teacher.export": lambda out: teacher_export.main(
          ["--data", str(tmp_path), "--out", out, "--image_teacher", "tiny-untrained"]),
      "export": lambda out: export.main(["--workdir", str(tmp_path), "--out", out]),
      "evaluate": lambda out: evaluate.main(["--model", str(tmp_path), "--out", out]),
  }
  for name, command in commands.items():
    for out, where in ((taken, "is a file"), (taken / "sub", f"lies under the file {taken}")):
      with pytest.raises(SystemExit) as exit_:
        command(str(out))
      assert exit_.value.code == (f"error: --out {out} {where}, not a directory: choose another "
                                  "--out"), name
  assert taken.read_text() == "keep"


@pytest.mark.parametrize("text,problem", [
    ('{"batch_size": 32,}', r"is not valid JSON \(Expecting property name enclosed in double "
                            r"quotes at line 1, column 19\)"),
    ("", r"is not valid JSON \(Expecting value at line 1, column 1\)"),
    ("[]", r"holds a JSON list"),
])
def test_a_hand_edited_config_json_is_one_line_naming_the_file(tmp_path, text, problem):
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(errors.UserError, match=re.escape(str(tmp_path / "config.json")) + " "
                     + problem + r", not the run's config: fix it, or copy the newest file of "
                     + re.escape(str(tmp_path / "starts")) + " over it$"):
    workdir_lib.stored_config(str(tmp_path))


def test_more_records_asked_for_than_the_data_holds_is_one_line(tmp_path):
  directory = str(tmp_path / "train")
  tiny_corpus.corpus(directory, num=16)
  with pytest.raises(records.DataError, match=rf"^config.data.num_records=17, but {directory} "
                     r"holds 16 records: set it to 16 or fewer, or leave it unset"):
    pipeline.make_dataset(directory, batch_size=8, image_size=16, seed=0, num_records=17)


def test_ctrl_c_in_any_command_is_one_line_and_status_130(capsys):
  """Every command's `main` runs under `errors.guard`: Ctrl-C prints what the
  command kept (`errors.Interrupted`'s message) or just that it stopped."""
  def interrupted(error):
    @errors.guard
    def main():
      raise error
    with pytest.raises(SystemExit) as stop:
      main()
    return stop.value.code, capsys.readouterr().err

  assert interrupted(KeyboardInterrupt()) == (130, "interrupted: Ctrl-C\n")
  assert interrupted(errors.Interrupted("saved step 7")) == (130, "interrupted: saved step 7\n")


def test_command_mistakes_are_one_line(tmp_path):
  cases = [
      (("dinorank_jax.main", "--config=configs/nope.py", f"--workdir={tmp_path}"),
       "cannot load the config file configs/nope.py: no such file"),
      (("dinorank_jax.data.verify", str(tmp_path / "none")), "no metadata.json in"),
      (("dinorank_jax.export", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "e")),
       "no training run at --workdir"),
      (("dinorank_jax.evaluate", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "r")),
       "no export at"),
      (("dinorank_jax.data.build", "--out", str(tmp_path / "d")),
       "error: the following arguments are required: --source"),
      (("dinorank_jax.data.verify", str(tmp_path), "--quick"),
       "error: unrecognized arguments: --quick "
       "(python -m dinorank_jax.data.verify --help lists the options)"),
  ]
  for argv, message in cases:
    code, out = commands.run(*argv)
    assert code == 1 and "Traceback" not in out and "usage:" not in out, (argv, out[-2000:])
    assert message in out, (argv, out[-2000:])


def test_prepare_without_a_held_out_path_trains_without_evaluation(tmp_path):
  config = runpy.run_path(os.path.join(CONFIGS, "demo.py"))["get_config"]()
  config.data.path, config.data.eval_path = str(tmp_path / "train"), ""
  config.data.synthetic.num_train = 64
  from dinorank_jax.data.prepare import prepare
  prepare(config)
  assert records.read_metadata(str(tmp_path / "train"))["teacher"] is not None
  assert sorted(os.listdir(tmp_path)) == ["train", "train-raw"]


def test_expected_os_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
  @errors.guard
  def full_disk():
    raise OSError(errno.ENOSPC, "No space left on device", "/data/out/shard-00003.array_record")

  with pytest.raises(SystemExit) as exit_:
    full_disk()
  assert exit_.value.code == ("error: No space left on device: /data/out/shard-00003.array_record:"
                              " free disk space (nothing complete was lost: rerun to resume)")

  @errors.guard
  def read_only():
    raise OSError(errno.EROFS, "Read-only file system", "/ro")

  with pytest.raises(SystemExit, match="read-only: choose a writable path"):
    read_only()

  @errors.guard
  def bug():
    raise KeyError("a bug")

  with pytest.raises(KeyError):
    bug()


def _fields(config, prefix=""):
  for k, v in config.items():
    yield f"{prefix}{k}"
    if hasattr(v, "items"):
      yield from _fields(v, f"{prefix}{k}.")


def test_every_config_field_an_error_names_exists():
  known = set()
  for name in ("r3.py", "demo.py", "alip.py"):
    known |= set(_fields(runpy.run_path(os.path.join(CONFIGS, name))["get_config"]()))
  named = set()
  package = os.path.join(ROOT, "dinorank_jax")
  for folder, _, files in os.walk(package):
    for f in files:
      if f.endswith(".py"):
        text = open(os.path.join(folder, f)).read()
        named |= set(re.findall(r"(?<![\w.])config\.((?:[a-z_]+\.)*[a-z_]+)", text))
  # Attribute chains in code (config.data.path) are fields too; methods are not.
  methods = {"to_dict", "to_json_best_effort", "get", "items", "keys", "update", "json", "py",
             "default_compilation_cache"}
  named = {n for n in named if n.split(".")[-1] not in methods}
  assert len(named) > 20
  missing = sorted(n for n in named if n not in known)
  assert not missing, missing


def test_cli_names_the_fix_for_bad_arguments(tmp_path):
  """`evaluate`'s mistakes: one `error:` line (status 1) for each, naming the fix."""
  from dinorank_jax.evaluate import __main__ as evaluate
  def mistake(*argv):
    with pytest.raises(SystemExit) as exit_:
      evaluate.main(list(argv))
    message = str(exit_.value.code)
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    return message

  assert "python -m dinorank_jax.export" in mistake("--model", str(tmp_path),
                                                    "--out", str(tmp_path / "r"))
  assert "python -m dinorank_jax.evaluate" in mistake("--compare", str(tmp_path),
                                                      "--out", str(tmp_path / "r"))
  assert "unknown suite 'nope': pick from imagenet" in mistake(
      "--model", str(tmp_path), "--suite", "nope", "--out", str(tmp_path / "r"))
  assert "the following arguments are required" in mistake()
