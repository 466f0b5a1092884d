from spark_backup.cli import main

main()
