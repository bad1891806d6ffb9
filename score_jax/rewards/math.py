"""Math reward: extract a completion's final answer and check it against the reference answer.

1. Extraction (`extract_answer`): the paper's form `Final Answer: The final answer is $X$. I hope
   it is correct.` (last occurrence), else the last `\\boxed{...}` (nested braces balanced), or,
   for toy tasks, the last match of a caller-given regex.
2. Normalisation (`normalize_answer`): LaTeX spelling variants (`\\dfrac`, `\\left`, `\\text{}`,
   units, spacing, thousands separators, trailing `.0`, `%`, degrees) map to one string.
3. Equivalence (`answers_match`): equal normalised strings match at once; otherwise math-verify
   decides symbolically, gold answer first, with its numeric comparison replaced by ours
   (`_numbers_equal`): exact values (integers, rationals, radicals, pi, e, factorials...) are
   compared exactly, a value written with a decimal within a relative tolerance (REL_TOL).
   math-verify's own rounds floats to 6 decimals and chops differences below ~1e-15, so it
   scores `1/2004!` against `1/2006!`, `e^{-50}` against `e^{-51}` and `0.333333` against `1/3`
   as equal: a reward an RL policy could learn to hack (issue 14). The workers patch it in.

math-verify's own timeouts use `signal.alarm`, which raises outside the main thread. We switch
them off (`parsing_timeout=None`, `timeout_seconds=None`) and run math-verify in a small pool
of worker processes instead, each check bounded by a wall-clock timeout after which the worker is
killed. So `math_reward` works the same in the main thread, in threads, and in worker processes
(even daemonic ones: workers are plain subprocesses). Before comparing, a worker drops any parsed
answer whose exact value could need more than MAX_EXACT_BITS bits (`_exact_bits`:
`10^{10^{10}}`, `(10^{10})!`), so a hostile answer scores 0 at once instead of filling memory
until the timeout; such answers still match by spelling.
"""
import atexit
import json
import logging
import math as stdlib_math  # this module is score_jax.rewards.math; `math` is still the stdlib
import os
import re
import select
import subprocess
import sys
import threading
import time

# A check that has not finished after this long counts as a mismatch (sympy can hang on
# inputs like 2^{2^{2^{100}}}).
CHECK_TIMEOUT_S = 5.0
# Address-space cap for a math-verify worker, so a pathological expression cannot eat the host.
WORKER_MEMORY_BYTES = 4 << 30
# A worker that has not imported math-verify after this long is broken.
WORKER_STARTUP_TIMEOUT_S = 120.0
# At most this many worker processes (about 150 MB each) by default, however many CPUs.
MAX_WORKERS = 8
# A decimal answer (a float) matches a value within this relative difference: 0.3333333333
# matches 1/3, 0.333333 does not.
REL_TOL = 1e-9
# A float expression matches 0 if its value is at most this (float rounding, e.g. 0.1+0.2-0.3);
# an exact nonzero value (10^{-20}) never matches 0.
ZERO_ABS_TOL = 1e-15
# A parsed answer whose exact value could need more bits than this (numerator or denominator,
# as bounded by `_exact_bits`: 2006! gets 22,000) is not evaluated; it matches only an answer
# spelled the same.
MAX_EXACT_BITS = 1 << 18

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- arguments

def require_str(value, argument: str, function: str) -> None:
    """Raises TypeError unless `value`, argument `argument` of `function`, is a str (model
    outputs always are; None, bytes or a number is a caller's bug, not a wrong answer)."""
    if not isinstance(value, str):
        raise TypeError(f"{function}() argument {argument!r} must be str, not "
                        f"{type(value).__name__}")


def require_str_list(values, argument: str, function: str) -> None:
    """Raises TypeError unless `values`, argument `argument` of `function`, is a sequence of
    str (not itself a str or bytes)."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{function}() argument {argument!r} must be a list of str, not "
                        f"{type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{function}() argument {argument!r} must be a list of str, but "
                            f"{argument}[{i}] is {type(value).__name__}")


# ---------------------------------------------------------------------------------- extraction

_FINAL_ANSWER_RE = re.compile(r"final answer is:?", re.IGNORECASE)
_HOPE_RE = re.compile(r"\.?\s*I hope it is correct", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")


def extract_answer(completion: str, pattern: str | None = None) -> str | None:
    """Returns the final answer written in `completion`, or None if it states none.

    With `pattern` (a regex), the answer is the last match's group named `answer`, else its
    group 1, else the whole match. Without it, the answer is the last paper-form final answer
    (`The final answer is $X$`), else the content of the last `\\boxed{...}`.
    """
    require_str(completion, "completion", "extract_answer")
    if pattern is not None:
        matches = list(re.finditer(pattern, completion))
        if not matches:
            return None
        last = matches[-1]
        if "answer" in last.re.groupindex:
            answer = last.group("answer")
        else:
            answer = last.group(1) if last.re.groups else last.group(0)
        return answer.strip() if answer is not None else None
    answer = _paper_form_answer(completion)
    if answer is None:
        answer = last_boxed(completion)
    return answer


def _paper_form_answer(text: str) -> str | None:
    """Content after the last 'final answer is', inside $...$, $$...$$, \\(...\\) or bare."""
    matches = list(_FINAL_ANSWER_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():].lstrip()
    for opener, closer in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(opener):
            end = _find_unescaped(rest, closer, len(opener))
            if end >= 0:
                return rest[len(opener):end].strip() or None
            break
    bare = _HOPE_RE.split(rest, maxsplit=1)[0].split("\n", 1)[0].strip()
    bare = bare.strip("$").strip()
    return bare.rstrip(".").strip() or None


def _find_unescaped(text: str, token: str, start: int) -> int:
    """Index of the first `token` at or after `start` not preceded by a backslash, else -1."""
    i = text.find(token, start)
    while i > 0 and text[i - 1] == "\\" and token == "$":
        i = text.find(token, i + 1)
    return i


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text` (braces balanced), or None."""
    matches = list(_BOXED_RE.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # `\boxed 5`: one bare token
        token = re.match(r"[^\s$]+", text[i:])
        return token.group(0) if token else None
    return _braced(text, i)


def _braced(text: str, open_index: int) -> str | None:
    """Content of the brace group opening at `open_index`; escaped braces do not count."""
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1:i]
        i += 1
    return None


def reference_answer(reference: str) -> str:
    """The answer in a MATH reference: its last \\boxed{}, a paper-form answer, or itself."""
    return extract_answer(reference) or reference.strip()


def final_answer(completion: str) -> str | None:
    """The completion's final answer, normalised (`normalize_answer`), or None: what majority
    voting counts."""
    answer = extract_answer(completion)
    return None if answer is None else normalize_answer(answer)


def answer_text(answer: str) -> str:
    """A completion stating `answer` in the paper's form, which `math_reward` scores as that answer."""
    return f"Final Answer: The final answer is ${answer}$. I hope it is correct."


# ------------------------------------------------------------------------------- normalisation

_UNIT_WORDS = (
    "units?", "square units?", "sq units?", "cubic units?", "degrees?", "radians?", "cm", "mm",
    "km", "m", "meters?", "metres?", "centimeters?", "kilometers?", "inch(?:es)?", "in",
    "feet", "foot", "ft", "yards?", "miles?", "mph", "hours?", "hrs?", "minutes?", "mins?",
    "seconds?", "secs?", "days?", "weeks?", "months?", "years?", "dollars?", "cents?",
    "pounds?", "lbs?", "ounces?", "oz", "grams?", "g", "kg", "liters?", "litres?", "ml",
    "gallons?", "points?", "ways?", "people", "students?", "times?", "percent",
)
_UNITS_RE = re.compile(  # a unit word after a number, set off by a space
    r"(?<=[\d}])\s+(?:" + "|".join(_UNIT_WORDS) + r")(?:\^\{?[23]\}?)?\s*$")
_TEXT_UNIT_RE = re.compile(r"(?<=\S)\s*\\(?:text|mbox|mathrm|textnormal)\{\s*[A-Za-z][A-Za-z .]*\}"
                           r"(?:\^\{?[23]\}?)?\s*$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textnormal|textrm|mbox|mathrm|mathbf)\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=(?!=)\s*")
_SPACE_RE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])|\s+")
_TRAILING_ZEROS_RE = re.compile(r"(?<![\d.])(\d+)\.0+(?![\d])")
_FRAC_SHORT_RE = re.compile(r"\\frac(?![A-Za-z{])\s*([^\s{}\\])\s*([^\s{}\\])")
_FRAC_HALF_RE = re.compile(r"\\frac\{([^{}]*)\}(?!\{)\s*([^\s{}\\])")
_FRAC_FIRST_RE = re.compile(r"\\frac(?![A-Za-z{])\s*([^\s{}\\])\s*(?=\{)")
_SQRT_SHORT_RE = re.compile(r"\\sqrt(?![A-Za-z{\[])\s*([^\s{}\\])")
_LEADING_POINT_RE = re.compile(r"(?<![\d}])\.(\d)")


def normalize_answer(answer: str) -> str:
    """A canonical spelling of a final answer: two answers equal after this are equal.

    Removes `$`, `\\boxed{}`, `\\left`/`\\right`, LaTeX spacing, `\\text{}` wrappers, trailing
    units, `%`, degrees and a leading `x =`; maps `\\dfrac`/`\\tfrac` to `\\frac` and
    `\\frac12` to `\\frac{1}{2}`; drops thousands separators and trailing `.0`; removes spaces
    except where one separates a LaTeX command from a letter (`\\pi r`).
    """
    s = answer.strip().strip("$").strip()
    while s.startswith(("\\boxed", "\\fbox")):
        inner = last_boxed(s)
        if inner is None:
            break
        s = inner.strip().strip("$").strip()
    s = s.replace("\n", " ").replace("\\!", "").replace("\\displaystyle", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[,;:> ]|~", " ", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = _TEXT_UNIT_RE.sub("", s)
    s = _UNITS_RE.sub("", s)
    s = _TEXT_RE.sub(lambda m: m.group(1), s)
    s = s.replace("{,}", ",").strip()
    s = _ASSIGNMENT_RE.sub("", s)
    if _THOUSANDS_RE.match(s.replace(" ", "")):
        s = s.replace(",", "")
    s = _SPACE_RE.sub(lambda m: (m.group(1) + " ") if m.group(1) else "", s)
    s = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_FIRST_RE.sub(r"\\frac{\1}", s)
    s = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", s)
    s = _LEADING_POINT_RE.sub(r"0.\1", s)
    s = _TRAILING_ZEROS_RE.sub(r"\1", s)
    return s.rstrip(".").strip()


# --------------------------------------------------------------------------------- equivalence

def answers_match(pred: str, gold: str, timeout_s: float = CHECK_TIMEOUT_S) -> bool:
    """True if answer `pred` equals answer `gold`: same normalised string, or math-verify says
    so within `timeout_s` seconds (a timeout is a mismatch). Safe in any thread or process."""
    require_str(pred, "pred", "answers_match")
    require_str(gold, "gold", "answers_match")
    pred_n, gold_n = normalize_answer(pred), normalize_answer(gold)
    if not pred_n or not gold_n:
        return False
    if pred_n == gold_n:
        return True
    return _POOL.verify(gold_n, pred_n, timeout_s)


def math_reward(completion: str, reference: str) -> float:
    """1.0 if the completion's final answer equals the reference answer, else 0.0.

    `reference` is either a bare answer (`\\frac{1}{2}`) or a solution holding one
    (`... \\boxed{\\frac{1}{2}}`). A completion with no extractable answer scores 0.0.
    Raises TypeError if either is not a str (decode bytes first).
    """
    require_str(completion, "completion", "math_reward")
    require_str(reference, "reference", "math_reward")
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    return 1.0 if answers_match(answer, reference_answer(reference)) else 0.0


def math_rewards(completions: list[str], references: list[str],
                 max_workers: int | None = None) -> list[float]:
    """`math_reward` over pairs; the symbolic checks run on parallel worker processes
    (`max_workers`, default min(CPUs, MAX_WORKERS))."""
    require_str_list(completions, "completions", "math_rewards")
    require_str_list(references, "references", "math_rewards")
    if len(completions) != len(references):
        raise ValueError(f"got {len(completions)} completions but {len(references)} references; "
                         "pass one reference per completion")
    from concurrent import futures  # local: only batch callers pay for it
    workers = max_workers or min(os.cpu_count() or 1, MAX_WORKERS)
    workers = max(1, min(len(completions), workers))
    with futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(math_reward, completions, references))


# ------------------------------------------------------------------------------ worker processes

class _Worker:
    """One math-verify process; used by one thread at a time. Protocol: a JSON line in
    ({"gold": str, "pred": str}), a JSON line out ({"equal": bool})."""

    def __init__(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from score_jax.rewards import math; math._serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self._buffer = b""
        if self._read_line(time.monotonic() + WORKER_STARTUP_TIMEOUT_S) != b"ready":
            self.close()
            raise RuntimeError("the math-verify worker did not start; check that `import "
                               "math_verify` works in this Python (pip install math-verify==0.9.0)")

    def verify(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """math-verify's verdict, or None if it took longer than `timeout_s` (worker then dead)."""
        request = json.dumps({"gold": gold, "pred": pred}).encode() + b"\n"
        try:
            self._proc.stdin.write(request)
            self._proc.stdin.flush()
        except BrokenPipeError:
            return None
        line = self._read_line(time.monotonic() + timeout_s)
        if line is None:
            return None
        return bool(json.loads(line)["equal"])

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class _WorkerPool:
    """Idle workers, handed to one calling thread at a time; a timed-out worker is killed."""

    def __init__(self, max_idle: int) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._pid = os.getpid()
        self._max_idle = max_idle

    def verify(self, gold: str, pred: str, timeout_s: float) -> bool:
        worker = self._acquire()
        verdict = worker.verify(gold, pred, timeout_s)
        if verdict is None:
            _log.warning("math check timed out after %.1fs (gold=%.80r, pred=%.80r); scoring 0",
                         timeout_s, gold, pred)
            worker.close()
            return False
        self._release(worker)
        return verdict

    def _acquire(self) -> _Worker:
        with self._lock:
            if os.getpid() != self._pid:  # forked: the inherited workers belong to the parent
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        return _Worker()

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            if os.getpid() == self._pid and len(self._idle) < self._max_idle:
                self._idle.append(worker)
                return
        worker.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            mine = os.getpid() == self._pid
        for worker in idle if mine else []:
            worker.close()


_POOL = _WorkerPool(max_idle=min(os.cpu_count() or 1, MAX_WORKERS))
atexit.register(_POOL.close)


def _serve() -> None:
    """Worker process main loop (see `_Worker`). Exits on stdin EOF or when its parent dies."""
    import resource

    import math_verify
    from math_verify import grader

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    if not callable(getattr(grader, "sympy_numeric_eq", None)):
        raise RuntimeError("math_verify.grader.sympy_numeric_eq is gone; this module replaces it "
                           "with _numbers_equal (pip install math-verify==0.9.0)")
    # math-verify looks it up as a module global on every comparison, in sets, tuples,
    # intervals, matrices and relations too.
    grader.sympy_numeric_eq = _numbers_equal
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    parent = os.getppid()

    def exit_when_orphaned() -> None:  # sympy may be stuck in C code: check from a thread
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            gold = _bounded(math_verify.parse(f"${request['gold']}$", parsing_timeout=None))
            pred = _bounded(math_verify.parse(f"${request['pred']}$", parsing_timeout=None))
            equal = bool(gold and pred and math_verify.verify(gold, pred, timeout_seconds=None))
        except Exception:  # noqa: BLE001 - any failure inside sympy is a mismatch, not a crash
            equal = False
        out.write(json.dumps({"equal": equal}).encode() + b"\n")
        out.flush()


# ------------------------------------------------------------- exact comparison (worker side)
# sympy and mpmath are imported inside these functions: only the workers load them.

_INF = float("inf")


def _bounded(parsed: list) -> list:
    """math-verify's parse results without the sympy ones too big to evaluate exactly (strings,
    which math-verify compares as strings, stay)."""
    return [p for p in parsed if isinstance(p, str) or _exact_bits(p) <= MAX_EXACT_BITS]


def _exact_bits(expr) -> float:
    """An upper bound on log2 of the largest numerator or denominator that evaluating `expr`
    exactly can build (inf if unbounded or the tree is too deep to walk): a+b and a*b add
    their operands' bits, a^n multiplies a's by |n|, n! has n log2 n. Symbols count as small
    numbers. Cheap: walks the unevaluated tree, evaluates nothing."""
    try:
        return _bits(expr)
    except Exception:  # noqa: BLE001 - RecursionError on a deep tree, or sympy: do not evaluate
        return _INF


def _bits(expr) -> float:
    """`_exact_bits` without the exception handling."""
    import sympy
    from sympy.functions.combinatorial import factorials

    if isinstance(expr, sympy.Rational):  # Integer too; exact for integers (2^bits = |value|)
        return stdlib_math.log2(max(abs(expr.p), expr.q, 2))
    if isinstance(expr, sympy.Float):
        _, mantissa, exponent, _ = expr._mpf_
        return max(int(mantissa).bit_length(), 1) + abs(exponent)
    if isinstance(expr, sympy.MatrixBase):
        return 1 + sum(_bits(entry) for entry in expr)
    if not isinstance(expr, sympy.Basic):
        return 1
    args = expr.args
    if isinstance(expr, sympy.Pow):  # |n| * bits(base) for an integer power n
        base, exponent = args
        if base in (0, 1, -1):  # 0^n, 1^n, (-1)^n stay small; n is still evaluated
            return _bits(exponent)
        return max(max(_bits(base), 1) * _magnitude(exponent), _bits(exponent))
    if isinstance(expr, sympy.exp):
        return max(2 * _magnitude(args[0]), _bits(args[0]))
    if isinstance(expr, (factorials.factorial, factorials.factorial2, factorials.subfactorial,
                         factorials.binomial, factorials.RisingFactorial,
                         factorials.FallingFactorial, sympy.gamma)):
        n = max(_magnitude(a) for a in args)
        return max(n * max(stdlib_math.log2(n), 1), *(_bits(a) for a in args))
    if isinstance(expr, (sympy.Sum, sympy.Product)):  # terms * bits of a term at the largest k
        term, *limits = args
        bits = _bits(term)
        for limit in limits:
            largest = max((_magnitude(bound) for bound in limit.args[1:]), default=_INF)
            bits *= 2 * largest * max(stdlib_math.log2(largest), 1)
        return bits
    return 1 + sum(_bits(a) for a in args)


def _magnitude(expr) -> float:
    """An upper bound on the absolute value of `expr`: 2 ** _bits (|p/q| <= max(|p|, q))."""
    bits = _bits(expr)
    return 2.0 ** bits if bits < 1000 else _INF


def _numbers_equal(a, b, float_rounding: int | None = None,
                   numeric_precision: int | None = None) -> bool:
    """Our replacement for math_verify.grader.sympy_numeric_eq (its arguments, which set its
    tolerances, are ignored): True if `a` and `b` are the same number, or matrices of them.

    Both exact (no decimal in them): exactly equal (rational arithmetic, else a high-precision
    numeric screen and sympy's `equals`; only where sympy cannot decide, agreement to 90
    significant digits). Either one with a decimal (a float): within a relative
    REL_TOL, or both 0 up to ZERO_ABS_TOL of float rounding. With free symbols: False here;
    math-verify then tries `simplify(a - b) == 0`, which is exact.
    """
    import sympy

    matrix = (sympy.MatrixBase, sympy.MatrixExpr)
    if isinstance(a, matrix) or isinstance(b, matrix):
        a, b = _doit(a), _doit(b)
        if not (isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase)
                and a.shape == b.shape):
            return False
        return all(_numbers_equal(x, y) for x, y in zip(a, b))
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr) and a.is_number
            and b.is_number):
        return False
    if a.has(sympy.Float) or b.has(sympy.Float):
        return _approximately_equal(a, b)
    return _exactly_equal(a, b)


def _doit(x):
    try:
        return x.doit()
    except Exception:  # noqa: BLE001 - sympy fails in many ways; keep the unevaluated form
        return x


def _value(x, digits: int):
    """`x` evaluated to `digits` significant digits as an mpmath number (call within
    mpmath.workdps(digits) or more), or None if it is not a finite number."""
    import mpmath
    import sympy

    try:
        value = sympy.N(x, digits)
        if not value.is_finite:
            return None
        return mpmath.mpmathify(value)
    except Exception:  # noqa: BLE001 - nan, zoo, unevaluable: not a number we can compare
        return None


def _close(x, y, rel_tol: float) -> bool:
    """|x - y| <= rel_tol * max(|x|, |y|) for mpmath numbers (so 0 is close only to 0)."""
    import mpmath

    return mpmath.fabs(x - y) <= rel_tol * max(mpmath.fabs(x), mpmath.fabs(y))


def _approximately_equal(a, b) -> bool:
    """Equality when at least one side holds a float (see `_numbers_equal`)."""
    import mpmath
    import sympy

    with mpmath.workdps(40):
        x, y = _value(a, 30), _value(b, 30)
        if x is None or y is None:
            return False
        if x == 0 or y == 0:  # relative tolerance is meaningless at 0
            nonzero, value = (b, y) if x == 0 else (a, x)
            return value == 0 or (nonzero.has(sympy.Float)
                                  and mpmath.fabs(value) <= ZERO_ABS_TOL)
        return _close(x, y, REL_TOL)


def _exactly_equal(a, b) -> bool:
    """Equality of two exact numbers (see `_numbers_equal`)."""
    import mpmath

    a, b = _doit(a), _doit(b)  # bounded: `_bounded` screened the sizes
    if a.is_Rational and b.is_Rational:
        return a == b
    with mpmath.workdps(60):
        x, y = _value(a, 50), _value(b, 50)
        if x is not None and y is not None and x != 0 and y != 0 and not _close(x, y, 1e-40):
            return False  # clearly different: skip sympy's slower proof
    try:
        verdict = (a - b).equals(0)
    except Exception:  # noqa: BLE001
        verdict = None
    if verdict is not None:
        return bool(verdict)
    with mpmath.workdps(110):  # sympy cannot decide: agreement to 100 digits decides
        x, y = _value(a, 100), _value(b, 100)
        return x is not None and y is not None and _close(x, y, 1e-90)
