# Convenience targets; each runs contrib/setup.sh, which installs what is missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: watch test bench install
watch:
	$(SUDO) bash contrib/setup.sh watch
test:
	$(SUDO) bash contrib/setup.sh test
bench:
	$(SUDO) bash contrib/setup.sh bench
install:
	$(SUDO) bash contrib/setup.sh install
