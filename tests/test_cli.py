from click.testing import CliRunner

from emofuse.cli import main
from emofuse.extract.encoders.base import backend_status


def test_encoders_lists_backends_and_checkpoints(tmp_path):
    ckpt = tmp_path / "fabnet.pth"
    ckpt.write_bytes(b"x")
    rows = backend_status({"video": {"backend": "fabnet", "checkpoint": str(ckpt)},
                           "audio": {"backend": "hf", "path": str(tmp_path / "missing")}})
    by = {r["backend"]: r for r in rows}
    assert set(by) == {"opensmile", "minilm", "dlib", "hf", "fairseq", "fabnet"}
    assert by["opensmile"]["installed"] and by["minilm"]["installed"] and by["dlib"]["installed"]
    assert by["fabnet"]["configured"] == [{"modality": "video", "file": str(ckpt), "present": True}]
    assert by["hf"]["configured"][0]["present"] is False

    config = tmp_path / "c.yaml"
    config.write_text(f"extract:\n  encoders:\n    audio: {{backend: hf, path: {tmp_path / 'missing'}}}\n")
    out = CliRunner().invoke(main, ["encoders", str(config)])
    assert out.exit_code == 0 and "(NOT FOUND)" in out.output and "opensmile" in out.output


def test_help_and_unknown_corpus_error(tmp_path):
    assert CliRunner().invoke(main, ["--help"]).exit_code == 0
    config = tmp_path / "c.yaml"
    config.write_text("corpus: {name: nosuch, root: .}\nextract: {encoders: {text: {backend: minilm}}}\n")
    out = CliRunner().invoke(main, ["extract", str(config)])
    assert out.exit_code == 2 and out.output.startswith("error: unknown corpus 'nosuch'")


def test_click_usage_errors_are_one_line_exit_2():
    """An unknown option, a missing argument or an unknown command: one line, exit code 2, as our own errors."""
    import subprocess
    import sys

    for args in (["train", "--nope"], ["evaluate"], ["bogus"], ["train", "--seeds", "many", "x.yaml"]):
        out = subprocess.run([sys.executable, "-m", "emofuse.cli", *args], capture_output=True, text=True)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, (args, out.stderr)
        assert "--help" in out.stderr and not out.stdout
    ok = subprocess.run([sys.executable, "-m", "emofuse.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "Usage: " in ok.stdout
