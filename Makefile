# The two commands of the README. Each does its own set-up (venv + torch + build).
CARGO ?= cargo
PROMPT ?= a red circle on a blue background

.PHONY: demo test setup lint bench fixtures app-check

setup:
	@./scripts/setup-libtorch.sh
	@./scripts/setup-gloo.sh

demo: setup
	$(CARGO) run --release --example text_to_image -- --prompt "$(PROMPT)" --out out

test: setup
	$(CARGO) test --workspace

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: setup
	$(CARGO) bench --workspace

# Builds the README's "Use it in your app" example outside the workspace and checks it.
app-check: setup
	./scripts/check-dependent-app.sh
