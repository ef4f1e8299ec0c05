from glmkit.cli import main

main()
