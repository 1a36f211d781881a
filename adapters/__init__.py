"""stresswatch adapters: one module per data source, registered under the
``stresswatch.sources`` entry-point group (see ``pyproject.toml``). The core never
imports these by name."""
