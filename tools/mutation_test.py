"""Mutation testing: does a test command notice when one operator or constant of a module changes?

    python tools/mutation_test.py genlib/metrics.py "python -m pytest -x -q tests/test_metrics.py"
    python tools/mutation_test.py genlib/energy.py "python -m pytest -x -q tests/test_energy.py" --only pit_depth
    python tools/mutation_test.py genlib/dae.py "..." --list                 # what would be mutated, and where

Each mutant changes one thing: an arithmetic operator (+ -, * /, ** *), a comparison (< <=, == !=, is / is not,
in / not in), ``and``/``or``, a unary minus or ``not`` dropped, a boolean flipped, a number bumped (an int by 1, a
float doubled). Error messages, annotations and default argument values are left alone (a default is a setting,
not logic). The command runs in ``--repo`` once per mutant; a mutant it passes *survived*: either the tests miss
a behaviour, or the mutant is equivalent (``shape[-1]`` and ``shape[1]`` of a square image). Read each survivor
and decide. The module is restored afterwards, also after Ctrl-C or SIGTERM; run it in a scratch worktree
(``git worktree add --detach /tmp/mut HEAD``) so that nothing else sees the mutants. Exit status 1 if any survived.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SWAP_BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
               ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.MatMult: ast.Mult}
SWAP_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
QUIET_CALLS = {"warn", "write", "print"}  # their arguments are messages


@dataclass
class Mutant:
    """One change: the node's index in ``ast.walk`` order, what to do to it, and where it is."""

    index: int
    kind: str          # binary, compare<k>, boolop, unary, bool, number
    change: str        # e.g. "Lt->LtE"
    line: int
    scope: str         # enclosing function, e.g. "EnergyGAN.step"


def bumped(value: int | float) -> int | float:
    """The number a mutant puts in place of ``value``: an int plus one, a float doubled (0.0 -> 1.0)."""
    if isinstance(value, int):
        return value + 1
    return value * 2 if value != 0 else 1.0


def untouchable(tree: ast.AST) -> set[int]:
    """ids of nodes not worth mutating: raise/assert statements, f-strings, annotations, defaults, messages."""
    skipped: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr)):
            skipped.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            skipped += [a.annotation for a in arguments if a.annotation] + [node.returns] * bool(node.returns)
            skipped += [d for d in node.args.defaults + node.args.kw_defaults if d is not None]
        elif isinstance(node, ast.AnnAssign):
            skipped.append(node.annotation)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in QUIET_CALLS:
            skipped.append(node)
    return {id(inner) for node in skipped for inner in ast.walk(node)}


def scopes(tree: ast.AST) -> dict[int, str]:
    """id of every node -> the name of the function or class holding it ("Class.method" for methods)."""
    owner: dict[int, str] = {}

    def visit(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = name
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{node.name}.{child.name}" if isinstance(node, ast.ClassDef) else child.name
            owner[id(child)] = inner
            visit(child, inner)

    visit(tree, "<module>")
    return owner


def find_mutants(tree: ast.AST) -> list[Mutant]:
    """Every single-node change of the module, in ``ast.walk`` order."""
    skip, owner = untouchable(tree), scopes(tree)
    found = []
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        where = (getattr(node, "lineno", 0), owner.get(id(node), "<module>"))
        if isinstance(node, ast.BinOp) and type(node.op) in SWAP_BINARY:
            change = f"{type(node.op).__name__}->{SWAP_BINARY[type(node.op)].__name__}"
            found.append(Mutant(index, "binary", change, *where))
        elif isinstance(node, ast.Compare):
            found += [Mutant(index, f"compare{k}", f"{type(op).__name__}->{SWAP_COMPARE[type(op)].__name__}", *where)
                      for k, op in enumerate(node.ops) if type(op) in SWAP_COMPARE]
        elif isinstance(node, ast.BoolOp):
            found.append(Mutant(index, "boolop", "and<->or", *where))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            found.append(Mutant(index, "unary", f"drop {type(node.op).__name__}", *where))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            found.append(Mutant(index, "bool", f"{node.value}->{not node.value}", *where))
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            found.append(Mutant(index, "number", f"{node.value!r}->{bumped(node.value)!r}", *where))
    return found


def mutated_source(tree: ast.AST, mutant: Mutant) -> str:
    """The module's source with ``mutant`` applied (re-printed by ast.unparse: comments are gone)."""
    tree = copy.deepcopy(tree)
    nodes = list(ast.walk(tree))
    node = nodes[mutant.index]
    if mutant.kind == "binary":
        node.op = SWAP_BINARY[type(node.op)]()
    elif mutant.kind.startswith("compare"):
        k = int(mutant.kind.removeprefix("compare"))
        node.ops[k] = SWAP_COMPARE[type(node.ops[k])]()
    elif mutant.kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif mutant.kind == "unary":
        replace_child(nodes, node, node.operand)
    elif mutant.kind == "bool":
        node.value = not node.value
    else:
        node.value = bumped(node.value)
    return ast.unparse(tree)


def replace_child(nodes: list[ast.AST], old: ast.AST, new: ast.AST) -> None:
    """Put ``new`` where ``old`` hangs in its parent (one of ``nodes``)."""
    for parent in nodes:
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list) and any(item is old for item in value):
                value[[item is old for item in value].index(True)] = new
                return
    raise ValueError("node has no parent")


def selected(mutants: list[Mutant], only: str, lines: str) -> list[Mutant]:
    """The mutants in the named scopes (a class name takes its methods) and on the given lines."""
    if only:
        names = only.split(",")
        mutants = [m for m in mutants
                   if any(m.scope == n or m.scope.endswith("." + n) or m.scope.startswith(n + ".") for n in names)]
    if lines:
        wanted = {int(line) for line in lines.split(",")}
        mutants = [m for m in mutants if m.line in wanted]
    return mutants


def run_command(command: str, repo: Path, timeout: float) -> int | str:
    """Exit status of the shell line ``command`` run in ``repo``, or ``'timeout'``. It runs in a process group of
    its own, killed whole on a timeout or an interruption: killing only the shell would leave the test process (a
    mutant's endless loop, say) running."""
    process = subprocess.Popen(command, shell=True, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the shell and whatever it left behind
        process.wait()


def run_mutants(module: Path, command: str, repo: Path, mutants: list[Mutant], tree: ast.AST,
                timeout: float, json_path: Path | None = None) -> list[dict]:
    """Run ``command`` once per mutant with the module rewritten; the original text is always put back. The
    results so far are rewritten to ``json_path`` after every mutant, so a stopped run keeps them."""
    if json_path:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from genlib.runtime import write_atomically  # imports torch: only when results are saved
    original = module.read_text()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` restores the module
    results = []
    try:
        for number, mutant in enumerate(mutants, 1):
            module.write_text(mutated_source(tree, mutant))
            start = time.time()
            code = run_command(command, repo, timeout)
            status = "SURVIVED" if code == 0 else "killed"
            results.append({**asdict(mutant), "status": status, "seconds": round(time.time() - start, 1)})
            print(f"[{number}/{len(mutants)}] {status} {module.name}:{mutant.line} {mutant.scope} {mutant.change}"
                  f" ({time.time() - start:.0f} s)", flush=True)
            if json_path:  # atomically: a SIGTERM mid-write must not leave a torn file
                write_atomically(json_path, lambda file: file.write((json.dumps(results, indent=1) + "\n").encode()))
    finally:
        module.write_text(original)
        signal.signal(signal.SIGTERM, previous)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("module", help="the source file to mutate, relative to --repo")
    parser.add_argument("command", help="the test command, run in --repo (a shell line)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="where the module lives and the command runs")
    parser.add_argument("--only", default="", help="comma-separated function or class names")
    parser.add_argument("--lines", default="", help="comma-separated line numbers")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run of the command")
    parser.add_argument("--json", type=Path, help="write the results here, updated after every mutant")
    args = parser.parse_args(argv)
    module = args.repo / args.module
    tree = ast.parse(module.read_text())
    mutants = selected(find_mutants(tree), args.only, args.lines)
    if args.list:
        for mutant in mutants:
            print(f"{args.module}:{mutant.line} {mutant.scope} {mutant.change}")
        print(f"{len(mutants)} mutants")
        return 0
    results = run_mutants(module, args.command, args.repo, mutants, tree, args.timeout, args.json)
    survivors = [r for r in results if r["status"] == "SURVIVED"]
    print(f"\n{len(survivors)} of {len(results)} survived")
    for r in survivors:
        print(f"  {args.module}:{r['line']} {r['scope']} {r['change']}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
