from gossip.cli import run

run()
