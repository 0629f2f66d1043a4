from simclr_cli.cli import main

main()
