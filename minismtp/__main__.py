from minismtp.cli import main

raise SystemExit(main())
