from alexnet.cli import run

run()
