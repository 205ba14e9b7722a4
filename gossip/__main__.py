from gossip.cli.main import run

run()
