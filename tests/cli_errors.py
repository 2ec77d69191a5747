"""The check every test of a refused command makes: one sentence on stderr, exit status 2, no traceback."""


def assert_one_sentence_error(result, *fragments):
    """``result`` (a CliRunner result) failed with exit 2 and one ``error: ...`` line that ends a sentence and holds
    every fragment; returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
