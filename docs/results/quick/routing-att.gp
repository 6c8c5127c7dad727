# Mean soft attention gate per domain and layer (rows) and attention expert (columns), one panel per BAM run; white = uniform 1/Ea
# Data: the .dat files beside this script. Redraw: gnuplot routing-att.gp
if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {
  set terminal pngcairo noenhanced size 1650,1440 font 'sans,9'
} else {
  set terminal png noenhanced size 1650,1440
}
set output 'routing-att.png'
set multiplot layout 2,3
unset key
set xtics rotate by -30 left
set palette defined (0 '#b2182b', 0.5 '#ffffff', 1 '#2166ac')
set xrange [-0.5:3.5]
set yrange [19.5:-0.5]
set ytics ('general L0' 0, 'general L1' 1, 'general L2' 2, 'general L3' 3, 'code L0' 4, 'code L1' 5, 'code L2' 6, 'code L3' 7, 'legal L0' 8, 'legal L1' 9, 'legal L2' 10, 'legal L3' 11, 'math L0' 12, 'math L1' 13, 'math L2' 14, 'math L3' 15, 'reference L0' 16, 'reference L1' 17, 'reference L2' 18, 'reference L3' 19)
set xtics ('0 seed' 0, '1 code' 1, '2 math' 2, '3 legal' 3)
set cbrange [0:0.500000]
set title 'bam-dm (uniform 1/4 = 0.250)'
plot 'routing-att.dat' index 0 using 1:2:3 with image, \
     '' index 0 using 1:2:(abs($3 - 0.250000) < 0.175000 ? sprintf('%.2f', $3) : '') with labels tc rgb 'black' font ',8', \
     '' index 0 using 1:2:(abs($3 - 0.250000) >= 0.175000 ? sprintf('%.2f', $3) : '') with labels tc rgb 'white' font ',8'
set xrange [-0.5:3.5]
set yrange [19.5:-0.5]
set ytics ('general L0' 0, 'general L1' 1, 'general L2' 2, 'general L3' 3, 'code L0' 4, 'code L1' 5, 'code L2' 6, 'code L3' 7, 'legal L0' 8, 'legal L1' 9, 'legal L2' 10, 'legal L3' 11, 'math L0' 12, 'math L1' 13, 'math L2' 14, 'math L3' 15, 'reference L0' 16, 'reference L1' 17, 'reference L2' 18, 'reference L3' 19)
set xtics ('0 seed' 0, '1 code' 1, '2 math' 2, '3 legal' 3)
set cbrange [0:0.500000]
set title 'bam-cm (uniform 1/4 = 0.250)'
plot 'routing-att.dat' index 1 using 1:2:3 with image, \
     '' index 1 using 1:2:(abs($3 - 0.250000) < 0.175000 ? sprintf('%.2f', $3) : '') with labels tc rgb 'black' font ',8', \
     '' index 1 using 1:2:(abs($3 - 0.250000) >= 0.175000 ? sprintf('%.2f', $3) : '') with labels tc rgb 'white' font ',8'
set xrange [-0.5:3.5]
set yrange [19.5:-0.5]
set ytics ('general L0' 0, 'general L1' 1, 'general L2' 2, 'general L3' 3, 'code L0' 4, 'code L1' 5, 'code L2' 6, 'code L3' 7, 'legal L0' 8, 'legal L1' 9, 'legal L2' 10, 'legal L3' 11, 'math L0' 12, 'math L1' 13, 'math L2' 14, 'math L3' 15, 'reference L0' 16, 'reference L1' 17, 'reference L2' 18, 'reference L3' 19)
set xtics ('0 seed' 0, '1 code' 1, '2 math' 2, '3 legal' 3)
set cbrange [0:0.500000]
set title 'bam-shared-kv-dm (uniform 1/4 = 0.250)'
plot 'routing-att.dat' index 2 using 1:2:3 with image, \
     '' index 2 using 1:2:(abs($3 - 0.250000) < 0.175000 ? sprintf('%.2f', $3) : '') with labels tc rgb 'black' font ',8', \
     '' index 2 using 1:2:(abs($3 - 0.250000) >= 0.175000 ? sprintf('%.2f', $3) : '') with labels tc rgb 'white' font ',8'
set xrange [-0.5:3.5]
set yrange [19.5:-0.5]
set ytics ('general L0' 0, 'general L1' 1, 'general L2' 2, 'general L3' 3, 'code L0' 4, 'code L1' 5, 'code L2' 6, 'code L3' 7, 'legal L0' 8, 'legal L1' 9, 'legal L2' 10, 'legal L3' 11, 'math L0' 12, 'math L1' 13, 'math L2' 14, 'math L3' 15, 'reference L0' 16, 'reference L1' 17, 'reference L2' 18, 'reference L3' 19)
set xtics ('0 seed' 0, '1 code' 1, '2 math' 2, '3 legal' 3)
set cbrange [0:0.500000]
set title 'bam-shared-kv-cm (uniform 1/4 = 0.250)'
plot 'routing-att.dat' index 3 using 1:2:3 with image, \
     '' index 3 using 1:2:(abs($3 - 0.250000) < 0.175000 ? sprintf('%.2f', $3) : '') with labels tc rgb 'black' font ',8', \
     '' index 3 using 1:2:(abs($3 - 0.250000) >= 0.175000 ? sprintf('%.2f', $3) : '') with labels tc rgb 'white' font ',8'
unset multiplot
