"""PatchHandle: what one `patch()` call did (its rows and records), how it applies a patch set to
a module, rebinds names imported by value, serves the import hook, and undoes it all."""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
import weakref
from collections.abc import Sequence

from ..backends import Backend
from .importing import _ImportHook, _initializing, _when_imported
from .records import _HANDLES, _LIVE, _LOCK, _MISSING, _build, _build_failure, _current, _guard, _Record, _resolve
from .registry import _SETS
from .routes import _ROUTES, RowStats
from .spec import DEFERRED, NOT_FOUND, OP_NAMES, PATCHED, SKIPPED, PatchSet, Row, Spec, _callable_of, signature_drift


class PatchHandle:
    """What one `patch()` call did: `report()`, `undo()`, context manager."""

    def __init__(self, backend: Backend, targets: Sequence[str], model=None,
                 enabled: frozenset[str] = frozenset(OP_NAMES)):
        self.backend = backend
        self.targets = list(targets)
        self.enabled = frozenset(enabled)
        self._model = weakref.ref(model) if model is not None else None
        self._records: list[_Record] = []
        self._rows: list[Row] = []
        self._seen_modules: set = set()
        self._rebind_scopes: dict[int, tuple] = {}
        self._deferred: list[tuple] = []  # (patch set, module) found half-imported, no spec hook
        self._alive = [True]  # read by every replacement (see _guard)
        self._stats: dict[int, RowStats] = {}  # row index -> its replacement's run-time counts
        self._undo_fns: list = []  # what PatchSet.apply hooks did elsewhere, undone first
        self._active = True

    @property
    def model(self):
        return self._model() if self._model is not None else None

    # report ------------------------------------------------------------------------------
    def add_row(self, target, symbol, status, reason, stats: RowStats | None = None) -> int:
        """Add a report row (one line: newlines in a reason become spaces); `stats` are the run-time
        counts of the replacement it installed. Returns the row's index."""
        self._rows.append(Row(target, symbol, status, " ".join(str(reason).split())))
        if stats is not None:
            self._stats[len(self._rows) - 1] = stats
        return len(self._rows) - 1

    def report(self) -> list[Row]:
        """Rows (target, symbol, status, reason), in the order they happened."""
        return list(self._rows)

    def row_counts(self) -> list[dict]:
        """Per report row, its run-time counts so far: calls, served (calls with no hand-back),
        handed_back, and the top hand-back reason (None for rows that installed no counted
        replacement, e.g. skipped ones)."""
        out = []
        for i, r in enumerate(self._rows):
            st = self._stats.get(i)
            d = r.as_dict()
            d.update(calls=st.calls if st else None, served=st.served if st else None,
                     handed_back=st.handed_back if st else None, top_reason=st.top_reason() if st else None)
            out.append(d)
        return out

    def _shown_status(self, i: int, row: Row) -> tuple[str, str]:
        """(status, calls column) of row i as report_table shows it: a patched row whose every call
        was handed back reads "handed-back", never plain "patched"."""
        st = self._stats.get(i)
        if st is None or st.calls == 0:
            return row.status, "-" if st is None else "0"
        calls = f"{st.served}/{st.calls} served"
        if st.handed_back:
            calls += f", {st.handed_back} handed back (top: {st.top_reason()})"
        if row.status == PATCHED and st.served == 0:
            return "handed-back", calls
        if row.status == PATCHED and st.handed_back:
            return "partly handed-back", calls
        return row.status, calls

    def runtime_handbacks(self) -> list[tuple]:
        """(op, reason, count) of this backend's run-time hand-backs so far: patched code that
        passed a call to the original and kernels that declined an input (dispatch_stats)."""
        from ..ops import dispatch_stats

        fb = dispatch_stats()["fallback"]
        return sorted((op, reason, n) for (op, b, reason), n in fb.items() if b == self.backend.name)

    def report_table(self) -> str:
        from ..utils.table import format_table

        ran = any(st.calls for st in self._stats.values())
        rows = []
        for i, r in enumerate(self._rows):
            status, calls = self._shown_status(i, r)
            rows.append((r.target, r.symbol, status, *((calls,) if ran else ()), r.reason))
        level = "instance" if self._model is not None else "module/class"
        ops_note = "" if self.enabled == frozenset(OP_NAMES) else f", ops: {', '.join(sorted(self.enabled)) or 'none'}"
        head = f"flux_npu patches (backend {self.backend.name}, {level} level{ops_note})"
        cols = ("target", "symbol", "status", "calls so far", "reason") if ran else ("target", "symbol", "status",
                                                                                      "reason")
        text = head + "\n" + format_table(cols, rows)
        if _ROUTES:
            text += "\nrun-time routes (calls so far):\n"
            text += format_table(("patched call", "served by", "calls"),
                                 [(w, r, str(n)) for (w, r), n in sorted(_ROUTES.items())])
        hb = self.runtime_handbacks()
        if hb:
            text += "\nrun-time hand-backs to stock code / reference (dispatch_stats()['fallback']):\n"
            text += format_table(("op", "reason", "calls"),
                                 [(op, " ".join(reason.split()), str(n)) for op, reason, n in hb])
        return text

    def __str__(self):
        return self.report_table()

    @property
    def active(self) -> bool:
        return self._active

    def patched_symbols(self) -> list[tuple]:
        return [(r.owner, r.attr) for r in self._records]

    # applying ----------------------------------------------------------------------------
    def _set(self, owner, attr, replacement) -> None:
        key = (id(owner), attr)
        if attr == "__class__":  # a per-instance class swap (see _apply_instance): restore by setattr
            original = owner.__class__
            owner.__class__ = replacement
            self._records.append(_Record(owner, attr, original, replacement, True, replacement))
            _LIVE[key] = self
            return
        had_own = attr in getattr(owner, "__dict__", {}) if not isinstance(owner, types.ModuleType) else True
        if isinstance(owner, (type, types.ModuleType)):
            original = owner.__dict__[attr] if had_own else getattr(owner, attr)
        else:
            original = owner.__dict__.get(attr) if had_own else None
            if not had_own and attr not in getattr(owner, "__dict__", {}):
                # an attribute an nn.Module keeps elsewhere (a submodule processor): restore by setattr
                cur = getattr(owner, attr, _MISSING)
                if cur is not _MISSING and not callable(getattr(type(owner), attr, None)):
                    original, had_own = cur, True
        setattr(owner, attr, replacement)
        self._records.append(_Record(owner, attr, original, replacement, had_own, _current(owner, attr)))
        _LIVE[key] = self

    def set_attr(self, owner, attr, replacement) -> str | None:
        """Replace owner.attr, recorded. Returns a reason if it was already patched."""
        with _LOCK:
            other = _LIVE.get((id(owner), attr))
            if other is not None and other._active:
                who = "this handle" if other is self else "another live flux_npu handle"
                return f"already patched by {who}"
            self._set(owner, attr, replacement)
            return None

    def on_undo(self, fn) -> None:
        """Run fn() on undo (before the symbol records are restored), for changes made elsewhere."""
        self._undo_fns.append(fn)

    def undo(self) -> None:
        """Restore every original (identity), newest first. Safe to call twice. A symbol that
        someone else replaced after us keeps their value (warned and reported); our replacement,
        if they later put it back, runs the original from then on."""
        with _LOCK:
            if not self._active:
                return
            self._alive[0] = False
            for fn in reversed(self._undo_fns):
                try:
                    fn()
                except Exception as exc:  # one failing undo must not stop the others
                    warnings.warn(f"flux_npu undo: {exc}", RuntimeWarning, stacklevel=2)
            self._undo_fns.clear()
            for rec in reversed(self._records):
                if _LIVE.get((id(rec.owner), rec.attr)) is self:
                    del _LIVE[(id(rec.owner), rec.attr)]
                if _current(rec.owner, rec.attr) is not rec.installed:
                    where = getattr(rec.owner, "__name__", type(rec.owner).__name__)
                    msg = (f"flux_npu undo: {where}.{rec.attr} was replaced by someone else after flux_npu patched it; "
                           "their value is left in place (flux_npu's replacement, if restored later, "
                           "runs the original)")
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                    self.add_row(where, rec.attr, SKIPPED, "left as is on undo: " + msg.split(": ", 1)[1])
                    continue
                if rec.had_own:
                    setattr(rec.owner, rec.attr, rec.original)
                else:
                    with contextlib.suppress(AttributeError):
                        delattr(rec.owner, rec.attr)
            self._records.clear()
            self._active = False
            if self in _HANDLES:
                _HANDLES.remove(self)
            if not _HANDLES:
                _ImportHook.uninstall()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    # module-level application --------------------------------------------------------------
    def apply_set(self, ps: PatchSet, module) -> None:
        name = module.__name__
        key = (ps.target, name, id(ps))
        if key in self._seen_modules:
            return
        if _initializing(module):
            # patch() ran while this module is still executing (e.g. called from inside it): its
            # symbols may not exist yet. Patch it when its import finishes, not now.
            if (ps, module) in self._deferred:
                return
            self._deferred.append((ps, module))
            if not _when_imported(module, lambda: self._finish_deferred(ps, module)):
                pass  # retried by the import hook's next event (_retry_deferred)
            self.add_row(name, "*", DEFERRED,
                         "module still importing when patch() ran: patched when its import finishes")
            return
        self._seen_modules.add(key)
        if ps.apply is not None:
            ps.apply(self, module)
            return
        for spec in ps.specs:
            self._apply_spec(ps, spec, module)

    def _finish_deferred(self, ps, module) -> None:
        if (ps, module) not in self._deferred:
            return
        self._deferred.remove((ps, module))
        if self._active and sys.modules.get(module.__name__) is module:
            with _LOCK:
                # the "deferred" row is settled now: it says so instead of staying in the table
                for i, r in enumerate(self._rows):
                    if r.status == DEFERRED and r.target == module.__name__ and r.symbol == "*":
                        self._rows[i] = Row(r.target, r.symbol, "settled",
                                            "was still importing when patch() ran: patched when its import finished "
                                            "(rows below)")
                self.apply_set(ps, module)

    def _retry_deferred(self) -> None:
        for ps, module in list(self._deferred):
            if not _initializing(module):
                self._finish_deferred(ps, module)

    def _apply_spec(self, ps: PatchSet, spec: Spec, module) -> None:
        name = module.__name__
        if not set(spec.ops) & self.enabled:
            if spec.symbol.split(".")[0] in vars(module):
                self.add_row(name, spec.symbol, SKIPPED,
                             f"excluded by patch(ops=/exclude=) ({', '.join(spec.ops)}): stock code kept")
            return
        try:
            owner, attr, original = _resolve(module, spec.symbol)
        except AttributeError:
            head = spec.symbol.split(".")[0]
            if "." in spec.symbol and head in vars(module) and vars(module)[head] is None:
                # e.g. current ComfyUI's `layers.RMSNorm = None` (its norms come from `operations`)
                self.add_row(name, spec.symbol, SKIPPED, f"{head} is None in this version: nothing to patch")
            elif not spec.optional:
                self.add_row(name, spec.symbol, NOT_FOUND, "symbol missing in this version (code drifted): left as is")
            return
        other = _LIVE.get((id(owner), attr))
        if other is not None and other._active:  # say so before reading (our) replacement's source
            who = "this handle" if other is self else "another live flux_npu handle"
            self.add_row(name, spec.symbol, SKIPPED, f"already patched by {who}")
            return
        drift = signature_drift(original, spec.params)
        if drift:
            self.add_row(name, spec.symbol, SKIPPED, drift)
            return
        try:
            replacement = _build(spec, original, self.backend, self.enabled)
        except Exception as exc:  # a builder that cannot cope with this version: skip, say why
            self.add_row(name, spec.symbol, SKIPPED, _build_failure(exc))
            return
        what = getattr(replacement, "__flux_npu_what__", spec.what)
        stats = RowStats()
        replacement = _guard(replacement, _callable_of(original), self._alive, stats)
        installed = staticmethod(replacement) if isinstance(original, staticmethod) else replacement
        reason = self.set_attr(owner, attr, installed)
        if reason:
            self.add_row(name, spec.symbol, SKIPPED, reason)
            return
        places = self._rebind(_callable_of(original), replacement, module) if spec.rebind else []
        extra = f" (also rebound by name in {len(places)} other module(s), rows below)" if places else ""
        self.add_row(name, spec.symbol, PATCHED, what + extra, stats)
        for place in places:  # one row per target module: another model's code now calls ours too
            mod_name, _, bound = place.rpartition(".")
            self.add_row(mod_name, bound, PATCHED, f"rebound by name to the patched {name}.{spec.symbol} "
                                                   "(its calls are counted on that row)")

    def _rebind(self, original, replacement, module) -> list[str]:
        """Replace names bound to `original` in the other loaded modules of the same top-level
        package, and remember the scope so modules imported later are rebound too."""
        top = module.__name__.split(".")[0]
        self._rebind_scopes[id(original)] = (original, replacement, top)
        places = []
        for mod in list(sys.modules.values()):
            if mod is module or not isinstance(mod, types.ModuleType):
                continue
            mname = getattr(mod, "__name__", "") or ""
            if mname.split(".")[0] != top:
                continue
            for k, v in list(vars(mod).items()):
                if v is original and self.set_attr(mod, k, replacement) is None:
                    places.append(f"{mname}.{k}")
        return places

    def has_seen(self, name: str) -> bool:
        return self._active and any(k[1] == name for k in self._seen_modules)

    def on_reexec(self, module) -> None:
        """Import hook callback for a module this handle patched that ran again (importlib.reload,
        or a fresh import after `del sys.modules[name]`): its classes and functions are new, stock
        objects, so it is patched again, with rows saying so."""
        if not self._active:
            return
        name = module.__name__
        with _LOCK:
            self._seen_modules = {k for k in self._seen_modules if k[1] != name}
            # names of this module object were rebound to fresh originals by the re-run: their old
            # records would only warn on undo; the re-patch records them anew
            stale = [r for r in self._records if r.owner is module]
            for r in stale:
                self._records.remove(r)
                if _LIVE.get((id(module), r.attr)) is self:
                    del _LIVE[(id(module), r.attr)]
        self.add_row(name, "*", "reloaded", "module executed again (importlib.reload or a fresh import): "
                                            "its new classes and functions are patched again (rows below)")
        self.on_import(module)

    def on_import(self, module) -> None:
        """Import hook callback: patch a newly imported module and rebind names it imported."""
        if not self._active:
            return
        if self._deferred:
            self._retry_deferred()
        name = getattr(module, "__name__", "") or ""
        for target in self.targets:
            for ps in _SETS.get(target, ()):
                if ps.applies_to(name, module):
                    self.apply_set(ps, module)
        top = name.split(".")[0]
        scopes = [(o, r) for o, r, scope in self._rebind_scopes.values() if scope == top]
        if not scopes:
            return
        for k, v in list(vars(module).items()):
            for original, replacement in scopes:
                if v is original and self.set_attr(module, k, replacement) is None:
                    self.add_row(name, k, PATCHED, "rebound on import to the patched replacement")
                elif v is replacement and (id(module), k) not in _LIVE:
                    # `from patched.module import name` ran after patching and bound the replacement
                    # itself: record it so undo() puts the original there too.
                    with _LOCK:
                        self._records.append(_Record(module, k, original, replacement, True, replacement))
                        _LIVE[(id(module), k)] = self
                    self.add_row(name, k, PATCHED, "imported the patched replacement by name (restored on undo)")
