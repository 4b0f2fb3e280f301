"""What a user can get wrong when quantizing: one clear line, exit 1, nothing written."""

from __future__ import annotations

import pytest
from test_bad_input import assert_clean_failure, run

from mlxlocal import quantize


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--mode", "mxfp4", "--bits", "3"], ["mxfp4 quantization takes 4 bits, not 3"]),
        (["--bits", "7"], ["takes 2, 3, 4, 5, 6 or 8 bits, not 7"]),
        (["--group-size", "48"], ["group size 32, 64 or 128, not 48"]),
        (["--mode", "nvfp4", "--group-size", "32"], ["nvfp4", "group size 16, not 32"]),
        (["--rule", "lm_head"], ["cannot read rule 'lm_head'", "PATTERN=BITS"]),
        (["--rule", "([=4"], ["is not a regular expression"]),
        (["--rule", "lm_head=eight"], ["'eight' is not BITS[/GROUP]"]),
        (["--rule", "lm_head=7"], ["not 7"]),
        (["--rule", "no_such_proj=4"], ["'no_such_proj' matches no quantizable layer"]),
        (["--target-bpw", "4.5", "--bits", "4"], ["--bits or --target-bpw, not both"]),
        (["--target-bpw", "4.5", "--mode", "mxfp4"], ["use --mode affine"]),
        (["--target-bpw", "2.5"], ["--target-bpw 2.5 is out of reach", "bits per weight"]),
        (["--target-bpw", "40"], ["--target-bpw 40.0 is out of reach"]),
    ],
)
def test_bad_request(flags, needles, checkpoints, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run("quantize", checkpoints("llama"), out, *flags), *needles, out=out)


def test_group_size_that_divides_nothing(checkpoints, tmp_path):
    out = tmp_path / "out"
    src = checkpoints("llama", intermediate_size=96)  # widths 64 and 96
    result = run("quantize", src, out, "--group-size", "128")
    assert_clean_failure(result, "group size 128 divides no layer width (64, 96)", out=out)


def test_already_quantized_source_is_refused(checkpoints, tmp_path):
    quantize(checkpoints("llama"), tmp_path / "q4", evaluate=False)
    out = tmp_path / "again"
    result = run("quantize", tmp_path / "q4", out)
    assert_clean_failure(result, "already quantized (4-bit affine)", "full-precision", out=out)


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "the file is empty"),
        (b"  \n\n ", "the file is empty"),
        (b"\x00\x01binary\xff\xfe", "not a UTF-8 text file"),
        (b"Just a few words.", "has only"),
    ],
)
def test_bad_calibration_text(content, needle, checkpoints, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    out = tmp_path / "out"
    result = run("quantize", checkpoints("llama"), out, "--calib", calib)
    assert_clean_failure(result, str(calib), needle, out=out)


@pytest.mark.parametrize(
    "content, needle", [("lm_head: [8\n", "not valid YAML"), ("- lm_head\n", "YAML mapping")]
)
def test_bad_rules_file(content, needle, checkpoints, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(content)
    out = tmp_path / "out"
    result = run("quantize", checkpoints("llama"), out, "--rules", rules)
    assert_clean_failure(result, needle, out=out)


def test_convert_quantize_flags(checkpoints, tmp_path):
    out = tmp_path / "out"
    result = run("convert", checkpoints("llama"), out, "--bits", "4")
    assert_clean_failure(result, "only with --quantize", out=out)
    result = run("convert", checkpoints("llama"), out, "--quantize", "--verify")
    assert_clean_failure(result, "drop --verify", out=out)
