from layerwise.cli import app

app(prog_name="layerwise")
