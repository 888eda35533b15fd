module goTimeOracle

go 1.21
