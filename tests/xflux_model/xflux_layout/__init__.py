"""Our own tiny code in x-flux's module layout (`flux.math`, `flux.modules.layers` with the
IP-adapter processors), under another top-level name so it never clashes with tests/bfl_model."""
