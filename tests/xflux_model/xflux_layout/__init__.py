"""Our own tiny code in x-flux's module layout (`flux.math`, `flux.modules.layers` with the
IP-adapter processors of both block kinds), under another top-level name so it never clashes with tests/bfl_model."""
