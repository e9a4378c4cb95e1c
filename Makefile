# carlos-audit: the two commands a newcomer runs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# The environment is locked: exact versions with their sha256 (requirements.lock, compiled from
# pyproject.toml's dependencies and extras and requirements.in's pins: torch 2.14.1, torchvision 0.29.1).
LOCK   := requirements.lock
LOCKTOOL ?= /tmp/carlos-audit-locktool
UV     := uv==0.13.10

.PHONY: setup system-deps demo test test-real bench clean world world-data world-loras world-bench lock

setup: system-deps $(STAMP)

# Debian libraries weasyprint (pango) and the PDF checks (poppler-utils) need.
DEB_PKGS := libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core poppler-utils
system-deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "carlos-audit needs these Debian packages:$$missing" >&2; \
	  echo "install them as root: apt-get install$$missing" >&2; exit 1; \
	fi

# Every distribution from the lock, each checked against its recorded sha256; then this package alone.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Refresh the lock deliberately (README "A locked environment"): the newest versions that satisfy
# pyproject.toml's floors, or with LOCK_CONSTRAINTS=FILE (`pip freeze` of a tested environment) those.
# Then run the suite on a fresh .venv (make clean test) before committing the new lock.
lock:
	@test -x $(LOCKTOOL)/bin/uv || $(PYTHON) -m pip install -q --target $(LOCKTOOL) $(UV)
	$(LOCKTOOL)/bin/uv pip compile pyproject.toml requirements.in --extra test --extra ray --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple \
	  --custom-compile-command "make lock$(if $(LOCK_CONSTRAINTS), LOCK_CONSTRAINTS=<pip freeze of the tested .venv>)" \
	  $(if $(LOCK_CONSTRAINTS),-c $(LOCK_CONSTRAINTS)) -o $(LOCK)
	sed -i '/^    #   -c /d' $(LOCK)

demo: setup
	$(VENV)/bin/carlos-audit demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# Full-size SDXL fixtures (random weights, ~13.6 GB in $$CARLOS_AUDIT_FIXTURES, built once): not in CI.
test-real: setup
	$(PY) -m pytest -q -p no:cacheprovider -m real tests

bench: setup
	$(PY) bench/run_all.py

# The trained world (world/README.md): pinned emoji data, then CLIP, VAE and base UNet trained from scratch, then
# the quality gates. Runs in the background's idle cycles (nice 19, one thread); WORLD_*_MIN are wall-time budgets.
WORLD_EXTRA   := world/build/extra
WORLD_RUN     := OMP_NUM_THREADS=1 WORLD_THREADS=1 PYTHONPATH=$(CURDIR)/$(WORLD_EXTRA) nice -n 19 $(CURDIR)/$(PY)
WORLD_CLIP_MIN ?= 25
WORLD_VAE_MIN  ?= 25
WORLD_UNET_MIN ?= 90
$(WORLD_EXTRA)/.installed: | $(STAMP)
	$(PIP) install -q --target $(WORLD_EXTRA) --no-deps cairosvg==2.9.1 cairocffi==1.7.1 defusedxml==0.7.1
	@touch $@

world-data: setup $(WORLD_EXTRA)/.installed
	cd world && $(WORLD_RUN) data.py

world: world-data
	cd world && { $(WORLD_RUN) train_clip.py --minutes $(WORLD_CLIP_MIN) & a=$$!; \
	  $(WORLD_RUN) train_vae.py --minutes $(WORLD_VAE_MIN) & b=$$!; wait $$a && wait $$b; }
	rm -rf world/build/checkpoints/clip_stage1 && mkdir -p world/build/checkpoints && \
	  cp -r carlos_audit/models/world/clip world/build/checkpoints/clip_stage1
	cd world && { $(WORLD_RUN) train_unet.py --clip build/checkpoints/clip_stage1 --minutes $(WORLD_UNET_MIN) & a=$$!; \
	  $(WORLD_RUN) train_clip.py --resume --freeze-text --batch 64 --minutes $(WORLD_CLIP_MIN) & b=$$!; \
	  wait $$a && wait $$b; }
	cd world && $(WORLD_RUN) evaluate.py

# The world's LoRAs with known truth (world/train_loras.sh: style per designer, with and without trigger,
# memorising, another seed, continued training, rescale 0.5, SVD rank 2) into world/loras/, then the LoRA gates.
world-loras: world-data
	cd world && PYTHON=$(CURDIR)/$(PY) OMP_NUM_THREADS=1 WORLD_THREADS=1 PYTHONPATH=$(CURDIR)/$(WORLD_EXTRA) nice -n 19 sh train_loras.sh

world-bench: world-data
	OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR) nice -n 19 $(CURDIR)/$(PY) bench/bench_world.py

clean:
	rm -rf $(VENV) build *.egg-info
