"""Stand-in for ``python`` in README command checks (tests/test_readme_commands.py): given the
command line a script would run (``-m torch.distributed.run [launcher flags] tools/x.py args``
or ``tools/x.py args``), it checks ``args`` against the tool's own parser, runs nothing, and
prints ``parsed tools/x.py``; a refused argument exits 2 with the parser's message."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    from test_readme_commands import parse_only

    tool = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
    if tool is None:
        print(f"readme_check: no tool in {argv}", file=sys.stderr)
        return 2
    try:
        parse_only(argv[tool], argv[tool + 1:])
    except BaseException as err:  # pytest.fail's exception: the parser's message
        print(str(err), file=sys.stderr)
        return 2
    print(f"parsed {argv[tool]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
