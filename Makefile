.PHONY: setup test demo lint proto bench
setup: ; bash scripts/setup.sh
test: ; bash scripts/test.sh
demo: ; bash scripts/demo.sh
lint: ; .venv/bin/ruff check . && .venv/bin/ruff format --check $$(ls -d nodeagent tests bench scripts 2>/dev/null) && .venv/bin/mypy
proto: ; .venv/bin/python scripts/gen_proto.py
bench: ; .venv/bin/python -m bench
