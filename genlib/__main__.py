from genlib.cli import main

main()
