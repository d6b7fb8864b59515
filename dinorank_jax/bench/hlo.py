"""What a compiled program moves, read from its HLO text (`compiled.as_text()`).

XLA's cost analysis is not available for an executable compiled for a GPU
that is not here (`aot`), so the prediction reads the optimised program
itself. Only the computations that run as such are walked: the entry, the
bodies of `while` loops (each as many times as XLA's `known_trip_count`; a
scanned layer stack is one), and `call`, `conditional` and `async-start`
targets; fused computations are inside the instruction that calls them.

- `collectives`: every all-reduce, all-gather, reduce-scatter, all-to-all and
  collective-permute, with its group size, the mesh axes it runs over (where
  XLA names them) and the bytes one device sends for it, by the bandwidth-
  optimal ring algorithm: an all-reduce of S bytes sends 2(n−1)/n · S; an
  all-gather (S its output), a reduce-scatter (S its input) and an
  all-to-all send (n−1)/n · S; a collective-permute sends S.
- `hbm_bytes`: the bytes each instruction reads and writes (its operands and
  its result), summed: a fusion reads its inputs from and writes its output
  to device memory once, which is what fusion is for. As in XLA's own GPU
  cost model, an operand a fusion only slices (`dynamic-slice`, `slice`)
  counts the slices it reads, and a `dynamic-update-slice` writes its update
  in place: a scanned stack's step touches one layer's rows of the stacked
  buffers, not all of them. Bitcasts, tuples, parameters and constants move
  nothing, nor does the `s8` scratch buffer a library call (cuBLAS, cuDNN)
  returns beside its result.
"""

import math
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_NAME = re.compile(r"%([\w.\-]+)")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
MOVE_NOTHING = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "call",
                "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
                "add-dependency", "async-start", "async-update", "async-done", "domain"}


def ring_factor(op: str, n: int) -> float:
  """The bytes one device sends per byte of the collective's payload."""
  if op == "collective-permute":
    return 1.0
  if n <= 1:
    return 0.0
  return 2 * (n - 1) / n if op == "all-reduce" else (n - 1) / n


def array_bytes(type_text: str) -> list[int]:
  """The bytes of every array of an HLO type (`f32[8,256]{1,0}`, or a tuple)."""
  return [math.ceil(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
          for dtype, dims in _ARRAY.findall(type_text)]


def _split_instruction(line: str):
  """`(name, type text, opcode, operand text, attribute text)` of one
  instruction line, or None."""
  head, eq, rest = line.strip().removeprefix("ROOT ").partition(" = ")
  if not eq or not head.startswith("%"):
    return None
  if rest.startswith("("):                       # a tuple type: find its closing bracket
    depth = 0
    for end, char in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        break
    type_text, rest = rest[:end + 1], rest[end + 1:].lstrip()
  else:
    type_text, _, rest = rest.partition(" ")
  opcode, bracket, rest = rest.partition("(")
  if not bracket:
    return None
  depth, end = 1, 0
  for end, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      break
  return head[1:], type_text, opcode, rest[:end], rest[end + 1:]


def computations(text: str) -> tuple[dict, str]:
  """`({name: [instructions]}, entry name)` of an HLO module's text; the
  last instruction of a computation is its root."""
  found, entry, current = {}, None, None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = found.setdefault(header.group(2), [])
      if header.group(1):
        entry = header.group(2)
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      parts = _split_instruction(line)
      if parts:
        current.append(parts)
  return found, entry


SLICES = ("dynamic-slice", "slice")


def _moved(instructions: list, operand_bytes: list[int], result_bytes: int) -> tuple[int, int]:
  """`(read, written)` bytes of a fused computation's `instructions` called on
  operands of `operand_bytes`: a parameter only sliced reads its slices, one
  only updated in place is not read, and an in-place update writes its update."""
  sizes, users = {}, {}
  for name, type_text, opcode, operands, _ in instructions:
    sizes[name] = sum(array_bytes(type_text))
    for position, used in enumerate(_NAME.findall(operands)):
      users.setdefault(used, []).append((opcode, position, name))
  read = 0
  for name, _, opcode, operands, _ in instructions:
    if opcode != "parameter":
      continue
    uses = users.get(name, [])
    if uses and all(op in SLICES and at == 0 for op, at, _ in uses):
      read += sum(sizes[user] for _, _, user in uses)
    elif uses and all(op == "dynamic-update-slice" and at == 0 for op, at, _ in uses):
      pass                                        # the buffer updated in place
    else:
      read += operand_bytes[int(operands)] if int(operands) < len(operand_bytes) else 0
  root = instructions[-1]
  roots = [root] if root[2] != "tuple" else [i for i in instructions
                                             if i[0] in _NAME.findall(root[3])]
  written = 0
  for _, type_text, opcode, operands, _ in roots:
    if opcode == "dynamic-update-slice":
      written += sizes.get(_NAME.findall(operands)[1], 0)
    else:
      written += sum(array_bytes(type_text))
  return read, (written if roots else result_bytes)


def _callees(opcode: str, attributes: str) -> list[tuple[str, int, bool]]:
  """The computations an instruction runs: `(name, times, trip count known)`."""
  if opcode == "while":
    body = re.search(r"body=%([\w.\-]+)", attributes).group(1)
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attributes)
    return [(body, int(trips.group(1)) if trips else 1, bool(trips))]
  if opcode in ("call", "async-start"):
    called = re.search(r"(?:to_apply|calls)=%([\w.\-]+)", attributes)
    return [(called.group(1), 1, True)] if called else []
  if opcode == "conditional":
    branches = re.findall(r"(?:branch_computations=\{|true_computation=|false_computation=|, )"
                          r"%([\w.\-]+)", attributes)
    return [(b, 1, True) for b in branches]
  return []


def group_size(attributes: str, devices: int) -> tuple[int, str]:
  """`(n, axes)` of a collective's `replica_groups`: the devices of one
  group, and the mesh axes XLA names for it (else `n devices`)."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if mesh:
    sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", mesh.group(1))}
    axes = re.findall(r"'(\w+)'", mesh.group(2))
    return math.prod(sizes[a] for a in axes), ",".join(axes)
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", attributes)
  if iota:
    n = int(iota.group(1).split(",")[-1])
  else:
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
    n = len(listed.group(1).split(",")) if listed else devices
  return n, f"{n} devices"


def read(text: str, devices: int) -> dict:
  """The collectives and the HBM bytes per device of one run of the program.

  Returns `{"collectives": [{"op", "n", "axes", "payload_bytes", "times",
  "sent_bytes"}], "hbm_bytes", "unknown_trip_counts"}`: `times` is how often
  the instruction runs per step, `sent_bytes` what one device sends for it in
  all (`ring_factor` × payload × times)."""
  program, entry = computations(text)
  out = {"collectives": [], "hbm_bytes": 0, "unknown_trip_counts": 0}

  def walk(name: str, times: int):
    sizes = {}
    for instr_name, type_text, opcode, operands, attributes in program[name]:
      result = array_bytes(type_text)
      sizes[instr_name] = sum(result)
      operand_bytes = [sizes.get(o, 0) for o in _NAME.findall(operands)]
      for callee, trips, known in _callees(opcode, attributes):
        out["unknown_trip_counts"] += not known
        walk(callee, times * trips)
      base = opcode.removesuffix("-start")
      if opcode.endswith("-done") or opcode in MOVE_NOTHING:
        continue
      fused = re.search(r"calls=%([\w.\-]+)", attributes) if opcode == "fusion" else None
      if fused:
        read, written = _moved(program[fused.group(1)], operand_bytes, sum(result))
      elif opcode in SLICES:
        read, written = sum(result), sum(result)
      elif opcode == "dynamic-update-slice":
        read = written = operand_bytes[1]
      else:
        read = sum(operand_bytes)
        written = (sum(array_bytes(type_text.replace("s8[", "scratch[")))
                   if opcode == "custom-call" else sum(result))
      out["hbm_bytes"] += times * (read + written)
      if base in COLLECTIVES:
        n, axes = group_size(attributes, devices)
        if base == "all-gather" and opcode.endswith("-start"):
          payload = sum(result[len(result) // 2:])        # (operands, outputs)
        elif base in ("reduce-scatter", "collective-permute"):
          payload = sum(operand_bytes)
        else:
          payload = sum(result)
        out["collectives"].append({"op": base, "n": n, "axes": axes, "payload_bytes": payload,
                                   "times": times,
                                   "sent_bytes": ring_factor(base, n) * payload * times})

  walk(entry, 1)
  return out
