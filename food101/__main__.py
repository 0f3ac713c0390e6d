from food101.cli import main

main()
