"""Running mmq on one machine: ``mmq up`` and its supervisor, the Flower launcher, ``mmq top``."""
