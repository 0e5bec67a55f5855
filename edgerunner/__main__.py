from edgerunner.cli import main

main()
