from blip3o.cli import main

raise SystemExit(main())
