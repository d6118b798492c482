from hopscope.cli import run

run()
