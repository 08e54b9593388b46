"""The program that starts inside each sandbox, before any untrusted code: `RUNNER`, passed to the interpreter with
`-c` (standard library only, Python 3.8+: the interpreter inside may be the system's `python3` with nothing
installed).

It reads its job, one JSON object, from stdin (then points stdin at `/dev/null`), sets the resource limits, runs the
job's code as a module named `run_name`, and writes what the parent asked for as JSON lines to the descriptor
`fds["out"]` (the parent passes it, and for a relayed check `fds["in"]` and `fds["done"]`, through bwrap):

- `mode="probes"`: after the code, each expression of `probes` evaluated in the module's namespace, as
  `{"v": <value as data>}` or `{"e": "<exception type>"}`. Values are encoded as tagged plain data (`encode`); the
  parent decodes them into fresh built-in objects, so no object of the program ever reaches the comparison.
- `mode="serve"`: after the code, answer calls `{"f": name, "a": args, "k": kwargs}` read from `in` with
  `{"v": result}` / `{"e": type}` on `out`, until `in` closes (the other side of a relayed check).
- `mode="check"`: trusted test code whose `candidate` names are proxies: each call goes out on `out` to the serving
  sandbox (through a pipe) and its answer comes back on `in`, as data; the line `{"done": true}` on `done` after the
  code returned normally.
- `mode="complete"`: the line `{"done": true}` after the code returned normally (what `run_code` reports as
  `require_completion`; the program can write to `out` too, so this is no proof).

The program shares this interpreter, so it can tamper with anything here, `out` included: what it can write there is
data only, and the expected values it would need to forge a verdict never enter the sandbox.
"""

RUNNER = r"""
import json, os, resource, sys
job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
null = os.open("/dev/null", os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
for name, value in job["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if hasattr(sys, "set_int_max_str_digits"):
    sys.set_int_max_str_digits(0)
fds = job["fds"]
for fd in fds.values():
    os.set_inheritable(fd, False)
out = os.fdopen(fds["out"], "w", encoding="utf-8")
SCALARS = (bool, int, float, str)
def encode(value, depth=0):
    if depth > 100:
        raise ValueError("nested too deeply")
    if value is None:
        return None
    for kind in SCALARS:
        if isinstance(value, kind):
            return {"s": kind(value)} if kind is str else kind(value) if kind is not bool else bool(value)
    if isinstance(value, complex):
        return {"c": [complex(value).real, complex(value).imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"b": bytes(value).hex()}
    if isinstance(value, dict):
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]}
    for kind, tag in ((tuple, "t"), (list, "l"), (frozenset, "f"), (set, "z")):
        if isinstance(value, kind):
            return {tag: [encode(item, depth + 1) for item in kind.__iter__(value)]}
    raise TypeError("not plain data: " + type(value).__name__)
def decode(value):
    if not isinstance(value, dict):
        return value
    (tag, body), = value.items()
    if tag == "s": return str(body)
    if tag == "c": return complex(*body)
    if tag == "b": return bytes.fromhex(body)
    if tag == "d": return {decode(k): decode(v) for k, v in body}
    return {"t": tuple, "l": list, "f": frozenset, "z": set}[tag](decode(item) for item in body)
def reply(stream, thunk):
    try:
        line = {"v": encode(thunk())}
    except BaseException as exc:
        line = {"e": type(exc).__name__}
    stream.write(json.dumps(line) + "\n")
    stream.flush()
sys.argv = ["main.py"]
module = type(sys)(job["run_name"])
module.__file__ = "main.py"
sys.modules[job["run_name"]] = module
mode = job["mode"]
if mode == "check":
    requests, answers = out, os.fdopen(fds["in"], "r", encoding="utf-8")
    class Remote:
        def __init__(self, name):
            self.name = name
        def __call__(self, *args, **kwargs):
            call = {"f": self.name, "a": encode(list(args)), "k": encode(kwargs)}
            requests.write(json.dumps(call) + "\n")
            requests.flush()
            answer = json.loads(answers.readline() or '{"e": "EOFError"}')
            if "e" in answer:
                raise RuntimeError("the solution raised " + str(answer["e"]))
            return decode(answer["v"])
    for local, remote in job["remote"].items():
        module.__dict__[local] = Remote(remote)
try:
    exec(compile(job["code"], "main.py", "exec"), module.__dict__)
except SystemExit:
    if mode == "complete":
        raise
    os._exit(1)
except BaseException as exc:
    import traceback
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "main.py":
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
if mode == "probes":
    for probe in job["probes"]:
        reply(out, lambda: eval(compile(probe, "<test>", "eval"), module.__dict__))
elif mode == "serve":
    for line in os.fdopen(fds["in"], "r", encoding="utf-8"):
        call = json.loads(line)
        reply(out, lambda: module.__dict__[call["f"]](*decode(call["a"]), **decode(call["k"])))
elif mode == "check":
    os.write(fds["done"], b'{"done": true}\n')
else:
    out.write('{"done": true}\n')
    out.flush()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""
