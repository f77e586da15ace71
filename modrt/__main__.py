from modrt.cli import main

main()
